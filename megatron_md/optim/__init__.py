"""Optimizers (plain ``torch.optim.Optimizer`` classes, shard-aware) and their references."""
from .base import MatrixOptimizer, SkippingOptimizer
from .hyperball import AdamH, MuonH
from .md import AdamMD, MuonMD
from .muon import Muon, NorMuon
from .rmnp import RMNP
from .schedule_free import SFAdamW, SFNorMuon

from .builder import MATRIX_OPTIMIZERS, OPTIMIZER_NAMES, OptimizerSet, build_optimizer  # noqa: E402
from .routing import DEFAULT_RULES, Rule, classify  # noqa: E402

__all__ = ["build_optimizer", "OptimizerSet", "OPTIMIZER_NAMES", "MATRIX_OPTIMIZERS", "classify", "Rule",
           "DEFAULT_RULES", "MatrixOptimizer", "SkippingOptimizer", "Muon", "NorMuon", "RMNP", "AdamH", "MuonH",
           "AdamMD", "MuonMD", "SFAdamW", "SFNorMuon"]
