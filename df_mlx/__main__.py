from df_mlx.cli import main

main()
