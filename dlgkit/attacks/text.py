"""Gradient leakage for text: the bag of words, DLG for text, and exact recovery from a span.

Three leaks, from the cheapest to the strongest:

1. :func:`bag_of_words`: a row of the word-embedding gradient is non-zero exactly when its
   token occurs in the input, and a row of the position-embedding gradient is non-zero exactly
   for the positions in use, so the set of tokens and the sequence length are read off.
2. :func:`reconstruct_text`: DLG (Zhu et al., 2019) for text. Dummy input embeddings are
   optimised until their gradient matches the shared one, then each position is decoded to a
   token (nearest vocabulary embedding by cosine, or a choice within the bag of words).
3. :func:`span_recover`: after DAGER (Petrov et al., 2024). The gradient of the first
   attention layer's query, key and value weights is a sum of outer products ``delta_t x_t^T``
   with the layer's inputs ``x_t = LayerNorm(word[token] + pos[t] + type[0])``, so its row space
   is spanned by those inputs. A candidate (token, position) is in the input exactly when its
   ``x`` lies in that span.

Defined in :doc:`/book/04_text_dlg`.
"""

from __future__ import annotations

import html
import numbers
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F

from dlgkit.attacks import engine
from dlgkit.attacks.engine import DECODERS, TextAttackConfig
from dlgkit.budget import device_of
from dlgkit.checks import check_finite_tensors, check_number, check_positive_int, check_seed
from dlgkit.nlp import TextModel, check_double_backward

__all__ = ["BAG_RULES", "BagOfWords", "bag_of_words", "text_label", "SpanResult", "span_residuals", "span_recover", "TextAttackConfig", "TextAttackResult", "reconstruct_text", "decode_embeddings", "mark_tokens", "history_table"]


def _param_name(tm: TextModel, param: torch.nn.Parameter) -> str:
    for name, p in tm.model.named_parameters():
        if p is param:
            return name
    raise ValueError("parameter not found in the model")  # pragma: no cover - internal


def _embeddings(tm: TextModel):
    base = getattr(tm.model, tm.model.base_model_prefix, tm.model)
    emb = getattr(base, "embeddings", None)
    if emb is None or not hasattr(emb, "position_embeddings"):
        raise ValueError(f"{type(tm.model).__name__} has no BERT-style embeddings (word + position + token type); the text attacks need a BERT-family model.")
    return base, emb


def _check_grads(grads: object) -> None:
    if not isinstance(grads, dict):
        raise TypeError(f"gradients must be a dict from parameter name to tensor (as dlgkit.nlp.text_gradient returns), got {type(grads).__name__}.")
    for name, g in grads.items():
        if not isinstance(g, torch.Tensor):
            raise TypeError(f"gradients[{name!r}] is a {type(g).__name__}, expected a tensor.")
        check_finite_tensors(f"gradients[{name!r}]", g)


def _require(grads: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    if name not in grads:
        raise KeyError(f"the shared gradients have no entry {name!r}; were they computed on this model?")
    return grads[name]


@dataclass
class BagOfWords:
    """Tokens read off the embedding gradient: ``ids`` (sorted), their WordPiece ``tokens``,
    the gradient row norm of each (``weights``), and the sequence ``length`` (positions whose
    position-embedding gradient row is non-zero; the longest sentence of a batch)."""

    ids: torch.Tensor
    tokens: list[str]
    weights: torch.Tensor
    length: int

    def __len__(self) -> int:
        return len(self.ids)


BAG_RULES = ("exact", "outliers")


def _rows_used(norms: torch.Tensor, rule: str, k: float) -> torch.Tensor:
    """Indices of the rows of an embedding table that the input used, from the L1 norms of the
    rows of its gradient."""
    if rule == "exact":
        return (norms > 0).nonzero().flatten()
    median = norms.median()
    spread = 1.4826 * (norms - median).abs().median()  # the MAD, scaled to a Gaussian's sigma
    if spread == 0:  # no noise in the bulk: the non-zero rows stand out
        return (norms > median).nonzero().flatten()
    return (norms > median + k * spread).nonzero().flatten()


def bag_of_words(grads: dict[str, torch.Tensor], tm: TextModel, rule: str = "exact", k: float = 10.0) -> BagOfWords:
    """Leak 1: the set of input tokens and the length. Defined in :doc:`/book/04_text_dlg`.

    ``rule="exact"`` keeps the rows of the word (and position) embedding gradient that are not
    zero: exact for an undefended gradient, useless once noise makes every row non-zero.
    ``rule="outliers"`` keeps the rows whose L1 norm stands out of the bulk by more than ``k``
    robust standard deviations (median plus ``k`` times 1.4826 MAD over all rows): most rows
    carry only noise, so the bulk measures the noise, and the few used rows stand out until the
    noise is comparable to them (chapter 5 measures where).
    """
    _check_grads(grads)
    if rule not in BAG_RULES:
        raise ValueError(f"rule={rule!r} is not known; choose one of {list(BAG_RULES)}.")
    if not isinstance(k, (int, float)) or isinstance(k, bool) or not k > 0:
        raise ValueError(f"k must be a positive number of robust standard deviations, got {k!r}.")
    _, emb = _embeddings(tm)
    word = _require(grads, _param_name(tm, emb.word_embeddings.weight))
    pos = _require(grads, _param_name(tm, emb.position_embeddings.weight))
    norms = word.abs().sum(dim=1)
    ids = _rows_used(norms, rule, k).cpu()
    used = _rows_used(pos.abs().sum(dim=1), rule, k)
    length = int(used.max()) + 1 if used.numel() else 0
    return BagOfWords(ids=ids, tokens=tm.tokens(ids), weights=norms[ids].cpu(), length=length)


def text_label(grads: dict[str, torch.Tensor], tm: TextModel) -> int:
    """The label of one sentence from the classifier's bias gradient (softmax minus one-hot:
    only the true class is negative), the text version of iDLG's rule."""
    _check_grads(grads)
    head = [k for k in grads if k.endswith("bias") and grads[k].dim() == 1 and grads[k].numel() == tm.num_labels]
    if not head:
        raise ValueError("no classifier bias gradient found among the shared gradients.")
    return int(grads[head[-1]].argmin())


def _layer0_inputs(tm: TextModel, token_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """x = LayerNorm(word[token] + pos[position] + type[0]) for pairs of (token, position)."""
    _, emb = _embeddings(tm)
    w = emb.word_embeddings.weight[token_ids]
    p = emb.position_embeddings.weight[positions]
    t = emb.token_type_embeddings.weight[0]
    return emb.LayerNorm(w + p + t)


def _first_layer_gradient(grads: dict[str, torch.Tensor], tm: TextModel) -> torch.Tensor:
    base, _ = _embeddings(tm)
    attn = base.encoder.layer[0].attention.self
    blocks = [_require(grads, _param_name(tm, getattr(attn, k).weight)) for k in ("query", "key", "value")]
    return torch.cat(blocks, dim=0).double()


def _span_basis(gradient: torch.Tensor, rank: int | None = None, rel_tol: float = 1e-5) -> torch.Tensor:
    """Orthonormal basis (d, rank) of the row space of ``gradient``: its top right singular
    vectors, ``rank`` of them or those above ``rel_tol`` times the largest singular value."""
    _, s, vh = torch.linalg.svd(gradient.double(), full_matrices=False)
    if rank is None:
        rank = int((s > rel_tol * s[0]).sum())
    return vh[:rank].T


def span_residuals(gradient: torch.Tensor, x: torch.Tensor, rank: int | None = None, rel_tol: float = 1e-5) -> tuple[torch.Tensor, int]:
    """Relative distance of each row of ``x`` (n, d) from the row space of ``gradient`` (m, d).

    The row space is taken from the singular vectors whose singular value exceeds
    ``rel_tol`` times the largest (or the top ``rank``). Returns (residuals, rank).
    """
    if gradient.dim() != 2 or x.dim() != 2 or gradient.shape[1] != x.shape[1]:
        raise ValueError(f"gradient (m, d) and candidates (n, d) must share d; got {tuple(gradient.shape)} and {tuple(x.shape)}.")
    basis = _span_basis(gradient, rank, rel_tol)
    return _residuals_off(basis, x), basis.shape[1]


def _residuals_off(basis: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Relative distance of each row of ``x`` from the span of the orthonormal ``basis``."""
    xd = x.double()
    residual = xd - (xd @ basis) @ basis.T
    return (residual.norm(dim=1) / xd.norm(dim=1).clamp_min(1e-30)).float()


@dataclass
class SpanResult:
    """Leak 3. ``ids`` holds, per position, the best candidate token (one sentence);
    ``found`` lists every accepted (position, token id, residual); ``residuals`` is the
    (candidates, positions) matrix; ``rank`` the dimension of the span."""

    ids: torch.Tensor
    found: list[tuple[int, int, float]]
    residuals: torch.Tensor
    candidates: torch.Tensor
    rank: int
    threshold: float
    seconds: float

    def per_position(self) -> list[list[int]]:
        """Accepted token ids at each position (several for a batch)."""
        out: list[list[int]] = [[] for _ in range(self.residuals.shape[1])]
        for p, t, _ in self.found:
            out[p].append(t)
        return out


@torch.no_grad()
def span_recover(grads: dict[str, torch.Tensor], tm: TextModel, candidates: torch.Tensor | str = "bag", length: int | None = None, threshold: float = 1e-6, rank: int | None = None) -> SpanResult:
    """Exact recovery from the span of the first attention layer's weight gradient.

    ``candidates`` are token ids to test (``"bag"``: the bag of words; ``"vocab"``: the whole
    vocabulary, a few seconds on a CPU). Every (candidate, position) pair is scored by its
    relative residual off the span; pairs under ``threshold`` are in the input. For one
    sentence, ``ids`` is the sentence. ``rank`` fixes the dimension of the span (by default it
    is read off the singular values; give it when noise hides the gap, as in chapter 5).
    Defined in :doc:`/book/04_text_dlg`.
    """
    start = time.perf_counter()
    check_number("threshold", threshold, low=0.0, hint="It is the largest relative residual off the span that counts as in the input, e.g. 1e-6.")
    check_positive_int("rank", rank, allow_none=True)
    bag = bag_of_words(grads, tm)
    if isinstance(candidates, str):
        if candidates not in ("bag", "vocab"):
            raise ValueError(f"candidates={candidates!r} is not known; give 'bag', 'vocab' or a tensor of token ids.")
        candidates = bag.ids if candidates == "bag" else torch.arange(tm.model.config.vocab_size)
    candidates = torch.as_tensor(candidates, dtype=torch.long).flatten().cpu()
    if candidates.numel() == 0:
        raise ValueError("no candidate tokens to test.")
    length = _check_length(bag.length if length is None else length, tm, 1)
    g = _first_layer_gradient(grads, tm)
    basis = _span_basis(g, rank)  # one SVD for every position
    used = basis.shape[1]
    cand = candidates.to(device_of(tm.model))
    columns = [_residuals_off(basis, _layer0_inputs(tm, cand, torch.full_like(cand, p))).cpu() for p in range(length)]
    residuals = torch.stack(columns, dim=1)
    if rank is None and used >= g.shape[1]:
        raise ValueError(f"the span has full dimension {used}: the batch holds at least as many (token, position) pairs as the hidden size {g.shape[1]}, so every candidate lies in it. Attack smaller batches.")
    best = residuals.argmin(dim=0)
    found = [(int(p), int(candidates[i]), float(residuals[i, p])) for i, p in (residuals < threshold).nonzero().tolist()]
    found.sort()
    return SpanResult(ids=candidates[best], found=found, residuals=residuals, candidates=candidates, rank=used, threshold=threshold, seconds=time.perf_counter() - start)


@dataclass
class TextAttackResult:
    """Outcome of :func:`reconstruct_text`: the decoded ``ids`` (with [CLS]/[SEP]), their
    ``text``, the decoded ids every ``record_every`` steps in ``history`` (with ``iters``), the
    gradient distance per step in ``losses`` (priors left out), the label used, the wall time,
    the final dummy input ``embeddings`` (L, d), for decoding them another way, and how the
    best trial ended (``status``: ``diverged`` means the ids are those last recorded before
    the distance turned NaN)."""

    ids: torch.Tensor
    text: str
    history: list[torch.Tensor] = field(default_factory=list)
    iters: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    label: int = 0
    seconds: float = 0.0
    embeddings: torch.Tensor | None = None
    status: str = "budget"


class _TextProblem:
    """The fixed parts of a text attack (model, target, bag, ends, mask, span basis) and the
    engine problem of one random start."""

    def __init__(self, tm: TextModel, grads: dict[str, torch.Tensor], config: TextAttackConfig, length: int, label: int, bag: BagOfWords) -> None:
        _, emb = _embeddings(tm)
        self.tm, self.config, self.length, self.emb = tm, config, length, emb
        self.word = emb.word_embeddings.weight.detach()
        special = tm.special_ids
        self.special = special
        inner = bag.ids[~torch.isin(bag.ids, torch.tensor([special["cls"], special["sep"], special["pad"]]))]
        if inner.numel() == 0:
            raise ValueError("the bag of words holds no ordinary token; is this the gradient of a sentence?")
        device = self.word.device
        self.inner = inner.to(device)
        self.free = length - 2 if config.fix_special else length
        names = [k for k, p in tm.model.named_parameters() if p.requires_grad and p is not emb.word_embeddings.weight]
        self.params = [p for k, p in tm.model.named_parameters() if k in set(names)]
        self.target = [_require(grads, k).to(device) for k in names]
        self.ends = (self.word[special["cls"]][None, None], self.word[special["sep"]][None, None])
        self.y = torch.tensor([label], device=device)
        self.mask = torch.ones(1, length, dtype=torch.long, device=device)
        self.types = torch.zeros(1, length, dtype=torch.long, device=device)
        self.span_basis = _span_basis(_first_layer_gradient(grads, tm)).float().to(device) if config.span_weight > 0 else None

    def embeds(self, z: torch.Tensor) -> torch.Tensor:
        core = z if self.config.parametrization == "embedding" else torch.softmax(z, dim=-1) @ self.word[self.inner]
        return torch.cat([self.ends[0], core, self.ends[1]], dim=1) if self.config.fix_special else core

    @torch.no_grad()
    def ids(self, z: torch.Tensor) -> torch.Tensor:
        if self.config.parametrization == "bag":
            core = self.inner[z[0].argmax(dim=1)].cpu()
        else:
            core = decode_embeddings(self.tm, z[0], self.config.decode, bag=self.inner)
        if self.config.fix_special:
            core = torch.cat([torch.tensor([self.special["cls"]]), core, torch.tensor([self.special["sep"]])])
        return core

    def span_prior(self, e: torch.Tensor) -> torch.Tensor:
        """Mean squared relative distance of the first layer's dummy inputs from the span."""
        emb = self.emb
        x = emb.LayerNorm(e[0] + emb.position_embeddings.weight[: self.length] + emb.token_type_embeddings.weight[0])
        off = x - (x @ self.span_basis) @ self.span_basis.T
        return (off.norm(dim=1) / x.norm(dim=1)).pow(2).mean()

    def __call__(self, generator: torch.Generator) -> engine.Problem:
        device, d = self.word.device, self.word.shape[1]
        if self.config.parametrization == "embedding":
            z = (torch.randn(1, self.free, d, generator=generator) * self.word.std().cpu()).to(device)
        else:
            z = (torch.randn(1, self.free, self.inner.numel(), generator=generator) * 0.1).to(device)
        z = z.contiguous().requires_grad_(True)
        current: dict[str, torch.Tensor] = {}

        def seen(create_graph: bool) -> list[torch.Tensor]:
            current["e"] = e = self.embeds(z)  # the span prior reads the same embeddings
            out = self.tm.model(inputs_embeds=e, attention_mask=self.mask, token_type_ids=self.types, labels=self.y)
            return list(torch.autograd.grad(out.loss, self.params, create_graph=create_graph))

        return engine.Problem(
            variables=[z], observe=seen, target=self.target,
            priors={"span": (self.config.span_weight, lambda: self.span_prior(current["e"]))},
            snapshot=lambda: self.ids(z),
        )


def _check_length(length: object, tm: TextModel, low: int) -> int:
    top = tm.max_length
    if not isinstance(length, numbers.Integral) or isinstance(length, bool) or not low <= int(length) <= top:
        raise ValueError(f"length must be an int in [{low}, {top}] (the model has {top} positions), got {length!r}.")
    return int(length)


def reconstruct_text(
    tm: TextModel,
    grads: dict[str, torch.Tensor],
    config: TextAttackConfig = TextAttackConfig(),
    *,
    length: int | None = None,
    label: int | None = None,
    seed: int = 0,
    record_every: int = 10,
    progress: bool | None = None,
) -> TextAttackResult:
    """Leak 2: DLG for text on one sentence, on :mod:`dlgkit.attacks.engine`'s loop.
    Defined in :doc:`/book/04_text_dlg`.

    ``config`` (:class:`~dlgkit.attacks.engine.TextAttackConfig`) holds the settings:
    ``parametrization="embedding"`` optimises a free vector per position (the paper's setting)
    and decodes it with ``decode`` (``"cosine"`` or ``"euclidean"`` over the whole vocabulary,
    or ``"bag"``: the most similar token of the bag of words); ``"bag"`` optimises, per
    position, a softmax over the bag's embeddings and decodes the most likely token.
    ``fix_special`` pins [CLS] and [SEP] at both ends; ``distance`` is ``"l2"`` (the paper's)
    or ``"cosine"``; the word-embedding gradient itself is left out of the matching (dummy
    embeddings produce none). ``span_weight > 0`` adds the distance of each dummy input of the
    first layer from the span of that layer's shared gradient (the idea of DAGER) as a prior.
    ``length`` and ``label`` default to what the gradient reveals (:func:`bag_of_words`,
    :func:`text_label`). The ids are recorded every ``record_every`` steps (and at 0 and the
    end). The model is left as it was (mode and ``.grad``).
    """
    if not isinstance(config, TextAttackConfig):
        raise TypeError(f"config must be a dlgkit.attacks.TextAttackConfig (e.g. TextAttackConfig(iterations=100)), got {type(config).__name__}.")
    check_positive_int("record_every", record_every)
    seed = check_seed("seed", seed)
    check_double_backward(tm.model)
    _check_grads(grads)
    start = time.perf_counter()
    bag = bag_of_words(grads, tm)
    length = _check_length(bag.length if length is None else length, tm, 3 if config.fix_special else 1)
    if label is None:
        label = text_label(grads, tm)
    elif not isinstance(label, numbers.Integral) or isinstance(label, bool) or not 0 <= int(label) < tm.num_labels:
        raise ValueError(f"label must be an int class index in [0, {tm.num_labels}), got {label!r}.")
    setup = _TextProblem(tm, grads, config, length, int(label), bag)
    with engine.caller_model_untouched(tm.model):
        outcome = engine.run(setup, config, tol=engine.absolute_tol(config, setup.target, 1), seed=seed,
                             history_every=record_every, progress=progress, desc="text DLG")
    best = outcome.best_trial
    z = best.problem.variables[0]
    ids = best.history[-1]
    return TextAttackResult(ids=ids, text=tm.decode(ids), history=best.history, iters=best.history_iters, losses=best.losses, label=int(label),
                            seconds=time.perf_counter() - start, embeddings=setup.embeds(z).detach()[0].cpu(), status=best.status)


@torch.no_grad()
def decode_embeddings(tm: TextModel, embeddings: torch.Tensor, how: str = "cosine", bag: torch.Tensor | None = None) -> torch.Tensor:
    """Token id of each row of ``embeddings`` (L, d): the vocabulary embedding nearest by
    ``"cosine"`` similarity or ``"euclidean"`` distance, or (``"bag"``) the most similar
    token among the ids in ``bag``. Defined in :doc:`/book/04_text_dlg`."""
    if how not in DECODERS:
        raise ValueError(f"how={how!r} is not known; choose one of {list(DECODERS)}.")
    if how == "bag" and (bag is None or len(bag) == 0):
        raise ValueError("how='bag' needs the bag of words: pass bag=bag_of_words(grads, tm).ids.")
    _, emb = _embeddings(tm)
    word = emb.word_embeddings.weight.detach()
    ids = torch.as_tensor(bag, device=word.device) if how == "bag" else torch.arange(word.shape[0], device=word.device)
    table = word[ids]
    e = embeddings.to(word.device, word.dtype)
    if how == "euclidean":
        best = torch.cdist(e, table).argmin(dim=1)
    else:
        best = (F.normalize(e, dim=1) @ F.normalize(table, dim=1).T).argmax(dim=1)
    return ids[best].cpu()


def mark_tokens(ids: torch.Tensor | Sequence[int], truth: torch.Tensor | Sequence[int], tm: TextModel, fmt: str = "html") -> str:
    """The decoded tokens of ``ids`` (special tokens left out), each wrong one (not the true
    token at its position) marked: bold red and underlined in ``"html"``, ``**`` in ``"text"``.
    Defined in :doc:`/book/04_text_dlg`."""
    if fmt not in ("html", "text"):
        raise ValueError(f"fmt={fmt!r} is not known; choose 'html' or 'text'.")
    truth = [int(t) for t in truth]
    specials = set(tm.special_ids.values())
    words = []
    for p, t in enumerate(int(i) for i in ids):
        if t in specials:
            continue
        token = tm.tokens([t])[0]
        right = p < len(truth) and truth[p] == t
        if fmt == "html":
            token = html.escape(token)
            words.append(token if right else f'<b style="color:#c00"><u>{token}</u></b>')
        else:
            words.append(token if right else f"**{token}**")
    return " ".join(words)


def history_table(result: TextAttackResult, truth: torch.Tensor | Sequence[int], tm: TextModel, every: int | None = None, fmt: str = "html") -> str:
    """The paper's iteration table: the decoded text at each recorded step with the wrong
    tokens marked (bold red in HTML, ``**`` in text), then the ground truth.
    ``every`` keeps only iterations that are multiples of it."""
    if fmt not in ("html", "text"):
        raise ValueError(f"fmt={fmt!r} is not known; choose 'html' or 'text'.")
    rows = []
    for it, ids in zip(result.iters, result.history):
        if every is not None and it % every and it != result.iters[-1]:
            continue
        rows.append((f"iter={it}", mark_tokens(ids, truth, tm, fmt)))
    rows.append(("ground truth", tm.decode(truth)))
    if fmt == "text":
        return "\n".join(f"[{a}] {b}" for a, b in rows)
    body = "".join(f"<tr><td style='white-space:nowrap'>{a}</td><td style='text-align:left'>{b if a != 'ground truth' else html.escape(b)}</td></tr>" for a, b in rows)
    return f"<table><thead><tr><th>step</th><th>decoded (wrong tokens in bold red, underlined)</th></tr></thead><tbody>{body}</tbody></table>"
