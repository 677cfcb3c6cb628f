"""Optimizers (plain ``torch.optim.Optimizer`` classes, shard-aware) and their references."""
from .base import MatrixOptimizer, SkippingOptimizer
from .hyperball import AdamH, MuonH
from .md import AdamMD, MuonMD
from .muon import Muon, NorMuon
from .rmnp import RMNP
from .schedule_free import SFAdamW, SFNorMuon

__all__ = ["MatrixOptimizer", "SkippingOptimizer", "Muon", "NorMuon", "RMNP", "AdamH", "MuonH",
           "AdamMD", "MuonMD", "SFAdamW", "SFNorMuon"]
