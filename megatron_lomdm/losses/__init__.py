"""OeMDM losses: per-position NELBO terms, the RLOO surrogate and the assembled objective."""

from megatron_lomdm.losses.nelbo import main_term, velocity_term
from megatron_lomdm.losses.objective import LossTerms, compute_loss_terms
from megatron_lomdm.losses.rloo import rloo_surrogate

__all__ = ["LossTerms", "compute_loss_terms", "main_term", "rloo_surrogate", "velocity_term"]
