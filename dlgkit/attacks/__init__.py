"""Gradient inversion attacks: recover private inputs (and labels) from shared gradients."""

from dlgkit.attacks.analytic import recover_linear_input
from dlgkit.attacks.image import PAPER_DLG, RECOMMENDED, RECOMMENDED_BATCH, AttackResult, gradient_distance, reconstruct, total_variation
from dlgkit.attacks.labels import batch_labels, idlg_label, label_set, last_linear_layer

__all__ = ["PAPER_DLG", "RECOMMENDED", "RECOMMENDED_BATCH", "AttackResult", "reconstruct", "gradient_distance", "total_variation", "idlg_label", "label_set", "batch_labels", "last_linear_layer", "recover_linear_input"]
