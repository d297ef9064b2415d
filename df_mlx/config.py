"""INI-backed global configuration, behaving like `df.config`.

Models and the enhancement pipeline read their hyper-parameters through the process-wide
`config` object. Lookup order, default persistence, casts and the legacy renames are the
reference's, so a `config.ini` written by upstream `df` loads unchanged here and the files
we write load in upstream `df`.
"""

import os
import string
from configparser import ConfigParser
from shlex import shlex
from typing import Any, List, Optional, Set, Tuple, Type, TypeVar, Union

from loguru import logger

T = TypeVar("T")

_TRUE = {"true", "yes", "y", "on", "1"}
_FALSE = {"false", "no", "n", "off", "0"}


class Csv:
    """Cast for comma separated values (`Csv(int)("1,2")` -> `[1, 2]`), as python-decouple."""

    def __init__(
        self, cast: Type[T] = str, delimiter=",", strip=string.whitespace, post_process=list
    ):
        self.cast = cast
        self.delimiter = delimiter
        self.strip = strip
        self.post_process = post_process

    def __call__(self, value: Union[str, Tuple[T], List[T]]) -> List[T]:
        if isinstance(value, (tuple, list)):
            value = self.delimiter.join(str(v) for v in value)
        splitter = shlex(value, posix=True)
        splitter.whitespace = self.delimiter
        splitter.whitespace_split = True
        return self.post_process(self.cast(s.strip(self.strip)) for s in splitter)


class Config:
    """The global configuration: environment variables override the INI file.

    A value read with a default is written back into the parser (`save=True`), so the first
    reader of a key fixes it for the whole process and `save()` persists it.
    """

    DEFAULT_SECTION = "settings"

    def __init__(self):
        self.parser: Optional[ConfigParser] = None
        self.path: Optional[str] = ""
        self.modified = False
        self.allow_defaults = True
        self.read: Set[Tuple[str, str]] = set()  # (section, key) lower-case, each key asked for since load

    def load(
        self, path: Optional[str], config_must_exist=False, allow_defaults=True, allow_reload=False
    ):
        self.allow_defaults = allow_defaults
        if self.parser is not None and not allow_reload:
            raise ValueError("Config already loaded")
        self.parser = ConfigParser()
        self.path = path
        self.read = set()
        if path is not None and os.path.isfile(path):
            with open(path) as f:
                self.parser.read_file(f)
        elif config_must_exist:
            raise ValueError(f"No config file found at '{path}'.")
        if not self.parser.has_section(self.DEFAULT_SECTION):
            self.parser.add_section(self.DEFAULT_SECTION)
        self._fix_clc()
        self._fix_df()

    def use_defaults(self, allow_reload=False):
        self.load(path=None, config_must_exist=False, allow_reload=allow_reload)

    def save(self, path: str):
        if not self.modified:
            logger.debug("Config not modified. No need to overwrite on disk.")
            return
        if self.parser is None:
            self.parser = ConfigParser()
        for section in self.parser.sections():
            if len(self.parser[section]) == 0:
                self.parser.remove_section(section)
        with open(path, mode="w") as f:
            self.parser.write(f)

    def tostr(self, value, cast) -> str:
        if isinstance(cast, Csv) and isinstance(value, (tuple, list)):
            return cast.delimiter.join(str(v) for v in value)
        return str(value)

    def set(self, option: str, value: T, cast: Type[T], section: Optional[str] = None) -> T:
        section = (self.DEFAULT_SECTION if section is None else section).lower()
        if not self.parser.has_section(section):
            self.parser.add_section(section)
        if self.parser.has_option(section, option):
            if value == self.cast(self.parser.get(section, option), cast):
                return value
        self.modified = True
        self.parser.set(section, option, self.tostr(value, cast))
        return value

    def __call__(
        self,
        option: str,
        default: Any = None,
        cast: Type[T] = str,
        save: bool = True,
        section: Optional[str] = None,
    ) -> T:
        section = self.DEFAULT_SECTION if section is None else section
        if self.parser is None:
            raise ValueError("No configuration loaded")
        self.read.add((section.lower(), option.lower()))
        if not self.parser.has_section(section.lower()):
            self.parser.add_section(section.lower())
        if option.upper() in os.environ:
            value = os.environ[option.upper()]
            if save:
                self.parser.set(section, option, self.tostr(value, cast))
        elif self.parser.has_option(section, option):
            value = self.parser.get(section, option)
        elif self.parser.has_option(section.lower(), option):
            value = self.parser.get(section.lower(), option)
        elif self.parser.has_option(self.DEFAULT_SECTION, option):
            logger.warning(
                f"Couldn't find option {option} in section {section}. "
                "Falling back to default settings section."
            )
            value = self.parser.get(self.DEFAULT_SECTION, option)
        elif default is None:
            raise ValueError("Value {} not found.".format(option))
        elif not self.allow_defaults and save:
            raise ValueError(f"Value '{option}' not found in config (defaults not allowed).")
        else:
            value = default
            if save:
                self.set(option, value, cast, section)
        return self.cast(value, cast)

    def cast(self, value, cast):
        if cast is bool:
            value = str(value).lower()
            if value in _TRUE:
                return True
            if value in _FALSE:
                return False
            raise ValueError("Parse error")
        return cast(value)

    def get(self, option: str, cast: Type[T] = str, section: Optional[str] = None) -> T:
        section = self.DEFAULT_SECTION if section is None else section
        self.read.add((section.lower(), option.lower()))
        if not self.parser.has_section(section):
            raise KeyError(section)
        if not self.parser.has_option(section, option):
            raise KeyError(option)
        return self.cast(self.parser.get(section, option), cast)

    def overwrite(self, section: str, option: str, value: Any):
        # Like the reference, a missing section/option is returned (not raised) as an error.
        if not self.parser.has_section(section):
            return ValueError(f"Section not found: '{section}'")
        if not self.parser.has_option(section, option):
            return ValueError(f"Option not found '{option}' in section '{section}'")
        self.modified = True
        return self.parser.set(section, option, self.tostr(value, type(value)))

    def _fix_df(self):
        """Move keys that older model configs kept elsewhere (df_order, p_reverb)."""
        p = self.parser
        if p.has_section("deepfilternet") and p.has_section("df"):
            for key in ("df_order", "df_lookahead"):
                if key in p["deepfilternet"]:
                    p["df"][key] = p["deepfilternet"][key]
                    del p["deepfilternet"][key]
        if p.has_section("train") and "p_reverb" in p["train"]:
            if not p.has_section("distortion"):
                p.add_section("distortion")
            p["distortion"]["p_reverb"] = p["train"]["p_reverb"]
            del p["train"]["p_reverb"]

    def _fix_clc(self):
        """Rename the pre-release `clc`/`convgru` names to `df`/`deepfilternet`."""
        p = self.parser
        if (
            not p.has_section("deepfilternet")
            and p.has_section("train")
            and p.get("train", "model") == "convgru5"
        ):
            self.overwrite("train", "model", "deepfilternet")
            p.add_section("deepfilternet")
            p["deepfilternet"] = p["convgru"]
            del p["convgru"]
        if not p.has_section("df") and p.has_section("clc"):
            p["df"] = p["clc"]
            del p["clc"]
        for section in p.sections():
            for k, v in list(p[section].items()):
                if "clc" in k.lower():
                    p.set(section, k.lower().replace("clc", "df"), v)
                    del p[section][k]

    def __repr__(self):
        msg = ""
        for section in self.parser.sections():
            msg += f"{section}:\n"
            for k, v in self.parser[section].items():
                msg += f"  {k}: {v}\n"
        return msg


config = Config()


class DfParams:
    """The `[df]` section: signal-processing parameters shared by every model family."""

    def __init__(self):
        self.sr: int = config("SR", cast=int, default=48_000, section="DF")
        self.fft_size: int = config("FFT_SIZE", cast=int, default=960, section="DF")
        self.hop_size: int = config("HOP_SIZE", cast=int, default=480, section="DF")
        self.nb_erb: int = config("NB_ERB", cast=int, default=32, section="DF")
        # Deep filtering is applied to bins [0, nb_df).
        self.nb_df: int = config("NB_DF", cast=int, default=96, section="DF")
        # Decay window [s] of the exponential feature normalisation.
        self.norm_tau: float = config("NORM_TAU", 1, float, section="DF")
        self.lsnr_max: int = config("LSNR_MAX", 35, int, section="DF")
        self.lsnr_min: int = config("LSNR_MIN", -15, int, section="DF")
        self.min_nb_freqs = config("MIN_NB_ERB_FREQS", 2, int, section="DF")
        self.df_order: int = config("DF_ORDER", cast=int, default=5, section="DF")
        self.df_lookahead: int = config("DF_LOOKAHEAD", cast=int, default=0, section="DF")
        self.pad_mode: str = config("PAD_MODE", default="input", section="DF")
