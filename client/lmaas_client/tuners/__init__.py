"""Tuners: each an ask/tell object with one config class, registered by name in `TUNERS` (here, and only here).

The kernel: `base.Tuner` (ask/tell, the one-loss-per-candidate check, state), `cmaes.CMATuner` (every CMA-ES
method), `options` (config fields several methods share) and `projection` (BBT's projection scaling and
placeholder tokens). None of the methods imports torch at import time (the white-box baseline and GDFO
load it inside their methods, from the optional `local` extra).
"""

from typing import Any

from lmaas_client.prompts import PromptCandidate
from lmaas_client.tuners.base import Tuner, TunerConfig
from lmaas_client.tuners.baselines import InContextLearning, ManualPrompt
from lmaas_client.tuners.bbt import BBTConfig, BBTTuner
from lmaas_client.tuners.bbtv2 import BBTv2Tuner
from lmaas_client.tuners.bdpl import BDPLTuner
from lmaas_client.tuners.dept import DePTTuner
from lmaas_client.tuners.gdfo import GDFOTuner
from lmaas_client.tuners.prompt_tuning import PromptTuning
from lmaas_protocol import ModelInfo

TUNERS: dict[str, type[Tuner]] = {
    cls.name: cls
    for cls in (ManualPrompt, InContextLearning, BBTTuner, BBTv2Tuner, BDPLTuner, DePTTuner, GDFOTuner, PromptTuning)
}


def make_tuner(method: str, model: ModelInfo, **options: Any) -> Tuner:
    """Build a registered tuner; unknown methods or options raise ValueError naming them."""
    if method not in TUNERS:
        raise ValueError(f"unknown method {method!r}; available: {', '.join(sorted(TUNERS))}")
    cls = TUNERS[method]
    return cls(cls.config_class(**options), model)


__all__ = ["TUNERS", "BBTConfig", "BBTTuner", "PromptCandidate", "Tuner", "TunerConfig", "make_tuner"]
