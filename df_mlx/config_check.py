"""Warnings for training configs that do less than they look like: settings no part of the
run reads (a `[deepfilternet3]` section where df's DFN3 reads `[deepfilternet]`, keys of a
loss that is not configured, GAN keys without gan_enabled), and loss sets that leave the mask
and DF decoders untrained (df's defaults: only LocalSnrLoss, which trains the SNR head).
Which keys were read comes from df_mlx.config's record of every key asked for since load."""

from typing import Dict, List, Optional

from loguru import logger

from df_mlx.config import config

# Keys that training reads only once it runs, after the check: run_epoch's LOG_FREQ,
# write_cp's history lengths, and the GAN epoch's update frequency and lr schedule.
READ_DURING_TRAINING = {
    ("train", "log_freq"), ("train", "n_checkpoint_history"), ("train", "n_best_checkpoint_history"),
    ("train", "discriminator_update_freq"), ("optim", "discriminator_lr_min"),
    ("optim", "discriminator_warmup_epochs"),
}


def unread_settings() -> Dict[str, List[str]]:
    """{section as written: its keys that no part of this run has read (nor will)}."""
    read = config.read | READ_DURING_TRAINING
    unread = {}
    for section in config.parser.sections():
        if section.lower() == config.DEFAULT_SECTION:
            continue
        keys = [k for k in config.parser[section] if (section.lower(), k.lower()) not in read]
        if keys:
            unread[section] = keys
    return unread


def warn_unread() -> List[str]:
    """Log one warning per config section with settings that have no effect; returns them."""
    from df_mlx.model import ModelParams

    model, model_section = config("MODEL", "deepfilternet3", section="train"), ModelParams().section
    warnings = []
    for section, keys in unread_settings().items():
        if len(keys) == len(config.parser[section]):
            hint = ""
            if section.lower().startswith("deepfilternet") and section.lower() != model_section:
                hint = f" (model {model} reads its settings from [{model_section}])"
            warnings.append(f"config.ini: section [{section}] is read by nothing in this training{hint}: "
                            f"{', '.join(keys)} {'has' if len(keys) == 1 else 'have'} no effect")
        else:
            warnings.append(f"config.ini: [{section}] {', '.join(keys)} read by nothing in this training: no effect")
    for w in warnings:
        logger.warning(w)
    return warnings


def _gan_enabled() -> bool:
    try:
        return config.get("gan_enabled", bool, "train")
    except KeyError:
        return False


def warn_untrained(losses) -> Optional[str]:
    """Warn when no active loss reaches the enhanced spectrum (so neither the ERB mask nor
    the DF decoder learns), or only MaskLoss does (the DF decoder does not learn). `losses`
    is a df_mlx.loss.Loss; GAN training's adversarial loss reaches both."""
    if _gan_enabled():
        return None
    spectrum = {"SpectralLoss": losses.sl_f, "MultiResSpecLoss": losses.mrsl_f, "SdrLoss": losses.sdrl_f}
    if any(f > 0 for f in spectrum.values()):
        return None
    fix = ("set a spectral loss, e.g. upstream DFN3's [MultiResSpecLoss] factor = 500, factor_complex = 500, "
           "gamma = 0.3, fft_sizes = 256,512,1024,2048 (README: Train)")
    if losses.ml_f > 0:
        if config("MASK_ONLY", False, bool, section="train"):
            return None
        msg = f"Only [MaskLoss] trains the enhancement: the DF decoder is never trained; {fix}"
    else:
        active = [f"LocalSnrLoss (factor {losses.lsnr_f:g})"] if losses.lsnr_f > 0 else []
        msg = (f"No loss trains the mask or the DF decoder (active: {', '.join(active) or 'none'}; LocalSnrLoss "
               f"trains only the SNR estimate); {fix}")
    logger.warning(msg)
    return msg
