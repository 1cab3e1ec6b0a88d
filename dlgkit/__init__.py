"""dlgkit: the helper library of the dlg-course book on gradient leakage.

Modules, each explained in a chapter of the book:

- :mod:`dlgkit.federated`: what clients share and how a server aggregates (chapter 1)
- :mod:`dlgkit.models`: the DLG paper's LeNet and a small ResNet (chapter 2)
- :mod:`dlgkit.data`: offline images as tensors in [0, 1] (chapters 1-2)
- :mod:`dlgkit.attacks`: gradient inversion and label recovery (chapter 2)
- :mod:`dlgkit.metrics`: MSE, PSNR, SSIM, label accuracy (chapter 2)
- :mod:`dlgkit.viz`: figures and the iteration scrubber widget (chapter 2)
- :mod:`dlgkit.budget`: quick/full budgets, seeding, device (all chapters)
"""

from dlgkit import attacks, budget, data, federated, metrics, models

__version__ = "0.1.0"
__all__ = ["attacks", "budget", "data", "federated", "metrics", "models", "__version__"]
