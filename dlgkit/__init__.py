"""dlgkit: the helper library of the dlg-course book on gradient leakage.

Modules, each explained in a chapter of the book:

- :mod:`dlgkit.federated`: what clients share and how a server aggregates (chapter 1)
- :mod:`dlgkit.data`: offline images as tensors in [0, 1] (chapters 1-2)
- :mod:`dlgkit.models`: the DLG paper's LeNet and a small ResNet (chapter 2)
- :mod:`dlgkit.attacks`: gradient inversion, in submodules:

  - :mod:`dlgkit.attacks.analytic`: a linear layer's input read off its gradient (chapter 1)
  - :mod:`dlgkit.attacks.image`: DLG/iDLG gradient matching for images (chapters 2-3)
  - :mod:`dlgkit.attacks.labels`: labels from the last layer's gradient (chapters 2-3)
  - :mod:`dlgkit.attacks.text`: gradient matching for text (chapter 4)

- :mod:`dlgkit.metrics`: MSE, PSNR, SSIM, label accuracy, batch alignment, token accuracy,
  ROUGE (chapters 2-4)
- :mod:`dlgkit.nlp`: the MiniLM text classifier (offline) and its gradients (chapter 4)
- :mod:`dlgkit.defences`: noise, pruning, quantisation, DP-SGD and the trade-off sweep
  (chapter 5)
- :mod:`dlgkit.viz`: figures and the iteration scrubber widget (chapters 2-5)
- :mod:`dlgkit.budget`: quick/full budgets, seeding, device (all chapters)
- :mod:`dlgkit.checks`: the shared argument checks and the success thresholds (all chapters)
- :mod:`dlgkit.exercises`: the automatic checks of the exercises (all chapters)

``import dlgkit`` loads attacks, budget, data, federated, metrics and models; import the
others by name (``from dlgkit import nlp``).
"""

from dlgkit import attacks, budget, data, federated, metrics, models

__version__ = "0.1.0"
__all__ = ["attacks", "budget", "data", "federated", "metrics", "models", "__version__"]
