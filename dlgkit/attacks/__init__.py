"""Gradient inversion attacks: recover private inputs (and labels) from shared gradients."""

from dlgkit.attacks.analytic import recover_linear_input
from dlgkit.attacks.engine import PAPER_DLG, RECOMMENDED, RECOMMENDED_BATCH, AttackConfig, TextAttackConfig, gradient_distance, gradient_observation
from dlgkit.attacks.image import AttackReport, AttackResult, reconstruct, total_variation
from dlgkit.attacks.labels import batch_labels, idlg_label, label_set, last_linear_layer
from dlgkit.attacks.vectorised import reconstruct_many

__all__ = ["AttackConfig", "TextAttackConfig", "PAPER_DLG", "RECOMMENDED", "RECOMMENDED_BATCH", "AttackResult", "AttackReport", "reconstruct", "reconstruct_many", "gradient_distance", "gradient_observation", "total_variation", "idlg_label", "label_set", "batch_labels", "last_linear_layer", "recover_linear_input"]
