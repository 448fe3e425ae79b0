"""Token-level preference methods as plug-ins: each is one file with a masker (and a config under
``configs/methods/``) on the extension point of ``masks.base`` (``TokenMasker`` + ``TokenContext``) and the generic
objectives ``WeightedDPO`` / ``MaskedSimPO``. See docs/token-weighting.md to write your own.

==================  ===============================  ==================  =============================
method              masker                           objective           extra frozen models
==================  ===============================  ==================  =============================
Rho-1-style         ``rho1.ExcessLossSelection``     ``WeightedDPO``     none (scores −ρ)
TIS-DPO             ``tisdpo.ContrastiveImportance`` ``WeightedDPO``     positive, negative
cDPO                ``cdpo.CriticalTokenWeights``    ``WeightedDPO``     positive, negative
ConfPO              ``confpo.LowConfidenceSelection`` ``MaskedSimPO``    none (reference-free)
SePO                ``sepo.OracleSelection``         ``MaskedSimPO``     oracle, oracle_reference
TGDPO               ``tgdpo.TokenRewardBeta``        ``WeightedDPO``     reward
span weights        ``spans.SpanWeights``            ``WeightedDPO``     none (data columns)
SamPO               ``sampo.DownSampledTokens``      ``WeightedDPO``     none
high-entropy        ``entropy.HighEntropySelection`` ``WeightedDPO``     none (reads the entropy)
AlignDistil         none                             ``AlignDistil``     dpo, reverse_dpo
T-REG               none                             ``TREG``            none (prompt variants, ref.-scored)
==================  ===============================  ==================  =============================

High-entropy selection and AlignDistil read full-vocabulary statistics (``distributions.py``,
docs/full-distribution.md); AlignDistil is an objective (``aligndistil.AlignDistil``), not a masker. T-REG is an
objective too (``treg.TREG``); it asks the data for contrastive prompt variants, which the reference scores
(``prompt_variants.py``, docs/treg.md).
"""

from sparsepo_lightning.methods.aligndistil import AlignDistil
from sparsepo_lightning.methods.cdpo import CriticalTokenWeights
from sparsepo_lightning.methods.confpo import LowConfidenceSelection
from sparsepo_lightning.methods.entropy import HighEntropySelection
from sparsepo_lightning.methods.rho1 import ExcessLossSelection
from sparsepo_lightning.methods.sampo import DownSampledTokens
from sparsepo_lightning.methods.sepo import OracleSelection
from sparsepo_lightning.methods.spans import SpanWeights
from sparsepo_lightning.methods.tgdpo import TokenRewardBeta
from sparsepo_lightning.methods.tisdpo import ContrastiveImportance
from sparsepo_lightning.methods.treg import TREG

__all__ = [
    "AlignDistil", "ContrastiveImportance", "CriticalTokenWeights", "DownSampledTokens", "ExcessLossSelection",
    "HighEntropySelection", "LowConfidenceSelection", "OracleSelection", "SpanWeights", "TokenRewardBeta", "TREG",
]
