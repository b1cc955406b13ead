"""Tuners: each an ask/tell object with one config class, registered by name in `TUNERS`.

Importing this package registers every method; none of them imports torch at import time (the white-box
baseline and GDFO load it inside their methods, from the optional `local` extra).
"""

from lmaas_client.prompts import PromptCandidate
from lmaas_client.tuners import baselines, bbtv2, bdpl, dept, gdfo, prompt_tuning  # noqa: F401 - registration
from lmaas_client.tuners.base import TUNERS, Tuner, TunerConfig, make_tuner, register_tuner
from lmaas_client.tuners.bbt import BBTConfig, BBTTuner

__all__ = ["TUNERS", "BBTConfig", "BBTTuner", "PromptCandidate", "Tuner", "TunerConfig", "make_tuner", "register_tuner"]
