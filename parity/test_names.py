"""Every public name of every df module (parity.reference.public_names: what it defines and
re-exports from df and libdf) exists in the df_mlx module of the same name, except the
deliberate omissions below, each with its reason."""

import importlib

import pytest

from parity.reference import modules, public_names

# Whole df modules df-mlx does not have (README "Not supported").
OMITTED_MODULES = {
    "scripts.dnsmos_v2": "DNSMOS web-API v2 client (df-mlx runs offline)",
    "scripts.export": "ONNX export of torch models; df-mlx exports torch checkpoints (dfmlx export)",
    "scripts.filter_dnsmos": "HDF5 dataset maintenance",
    "scripts.fix_n_samples_hdf5": "HDF5 dataset maintenance",
    "scripts.list_attrs_in_hdf5": "HDF5 dataset maintenance",
    "scripts.model_summary": "ptflops model summary (torch-only)",
    "scripts.plot_lrs": "plotting script of df's training runs",
    "scripts.plot_spec": "plotting script",
    "scripts.plot_summaries": "plotting script of df's training runs",
    "scripts.print_model": "prints a torch module",
    "scripts.sample_from_hdf5": "HDF5 dataset maintenance",
    "scripts.split_hdf5": "HDF5 dataset maintenance",
    "scripts.test_df": "df's own CI script",
    "scripts.test_dns_2020": "dataset-specific evaluation script",
    "scripts.test_noisy_dnsmos": "dataset-specific evaluation script",
    "scripts.test_voicebank_demand": "dataset-specific evaluation script",
    "scripts.trim_silence_hdf5": "HDF5 dataset maintenance",
}

# Single names df-mlx leaves out, per module.
OMITTED = {
    "checkpoint": {"test_check_patience": "df's inline test function"},
    "modules": {n: "df's inline test function" for n in ("test_dfop", "test_erb", "test_grouped_gru", "test_unit_norm")},
    "loss": {"test_local_snr": "df's inline test function",
             "ASRLoss": "needs a Whisper model, which cannot be had offline (Loss raises a clear error)"},
    "logger": {"grouped_linear_flops_counter_hook": "a ptflops hook; ptflops is torch-only"},
    "multiframe": {n: "df's debugging scripts (icecream, a test sample)"
                   for n in ("compute_all_mf", "compute_ideal_mvdr", "compute_ideal_wf")},
    "train": {"summary_noop": "an unused no-op in df"},
    "evaluation_utils": {"DnsMosP808ApiMetric": "DNSMOS web API (df-mlx runs offline)",
                         "DnsMosP835ApiMetric": "DNSMOS web API (df-mlx runs offline)",
                         "dnsmos_api_req": "DNSMOS web API (df-mlx runs offline)",
                         "download_onnx_models": "downloads; the ONNX models come from speechmos"},
    "scripts.dnsmos": {"ORT_PROVIDERS_ALL": "torch-era provider lists; get_ort_session picks providers by name",
                       "ORT_PROVIDERS_CPU": "torch-era provider lists; get_ort_session picks providers by name",
                       "URL_ONNX": "download URL (offline)", "URL_P808": "web API URL (offline)",
                       "URL_P835": "web API URL (offline)", "dnsmos_api_req": "DNSMOS web API (offline)",
                       "download_onnx_models": "downloads; the ONNX models come from speechmos"},
    "scripts.dnsmos_dns5": {"URL_ONNX": "download URL (offline)",
                            "download_onnx_models": "downloads; the ONNX models come from speechmos",
                            "SLEEP_MS": "throttle of the dataset driver eval_ds (not ported)",
                            "eval_dir_dnsmos": "folder/HDF5 dataset drivers of the script (not ported)",
                            "eval_ds": "folder/HDF5 dataset drivers of the script (not ported)",
                            "load_encoded": "folder/HDF5 dataset drivers of the script (not ported)",
                            "print_csv": "folder/HDF5 dataset drivers of the script (not ported; needs pandas)"},
}


def test_omissions_name_real_df_names():
    """The lists above cannot go stale: every omitted module and name exists in df."""
    assert set(OMITTED_MODULES) <= set(modules())
    for module, names in OMITTED.items():
        assert set(names) <= public_names(module), module


@pytest.mark.parametrize("module", [m for m in modules() if m not in OMITTED_MODULES])
def test_every_df_name_exists(module):
    ours = importlib.import_module("df_mlx" + (f".{module}" if module else ""))
    missing = sorted(public_names(module) - set(dir(ours)) - set(OMITTED.get(module, {})))
    assert not missing, f"df_mlx.{module or '__init__'} lacks df's {', '.join(missing)}"


def test_top_level_and_full_example_imports():
    """df/__init__'s `enhance` is the function (it shadows the module, as in df)."""
    import df_mlx
    from df_mlx import enhance, init_df  # noqa: F401
    from df_mlx.enhance import enhance as enhance_fn, init_df as init_fn, load_audio, save_audio  # noqa: F401

    assert enhance is enhance_fn and callable(enhance) and df_mlx.init_df is init_fn
    assert set(df_mlx.__all__) == {"config", "version", "enhance", "init_df"}
