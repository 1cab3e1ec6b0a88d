"""Benchmark: the three text leaks of chapter 4 on every shipped sample sentence.

For each sentence of ``dlgkit.nlp.SAMPLE_SENTENCES`` (8 to 38 tokens with [CLS] and [SEP]),
one client gradient on MiniLM-L6 (label 1):

- bag of words: recall and precision of the token set read off the embedding gradient;
- span method (after DAGER): token accuracy, exact match and wall time, pretrained weights;
- DLG (free embeddings, Adam 0.01, decoding within the bag) on the randomly initialised model:
  token accuracy, ROUGE-1/2, wall time;
- DLG on the pretrained model, plain (free embeddings) and "within the bag + span prior".

Run: ``python benchmarks/text_attacks.py`` (full budget: 300 DLG steps on the random model,
200 on the pretrained one); ``DLGKIT_QUICK=1`` for 60/40 steps; ``--sentences 0 1`` for a
subset; ``--no-pretrained-dlg`` to skip the slowest column. The table goes to
``benchmarks/results/text_attacks.md``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import machine, write_table  # noqa: E402

from dlgkit import budget, metrics, nlp  # noqa: E402
from dlgkit.attacks import text as ta  # noqa: E402


def _dlg(tm, grads, ids, steps, **options) -> dict:
    result = ta.reconstruct_text(tm, grads, ta.TextAttackConfig(iterations=steps, **options), record_every=steps, progress=False)
    r = metrics.rouge(result.text, tm.decode(ids))
    return {"acc": metrics.token_accuracy(result.ids, ids, ignore=[101, 102]), "r1": r["rouge1"], "r2": r["rouge2"], "s": result.seconds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sentences", type=int, nargs="*", help="indices into SAMPLE_SENTENCES (default: all)")
    parser.add_argument("--no-pretrained-dlg", action="store_true", help="skip DLG on the pretrained model")
    args = parser.parse_args()
    chosen = args.sentences if args.sentences else list(range(len(nlp.SAMPLE_SENTENCES)))
    steps_scratch = budget.budget(full=300, quick=60)
    steps_pre = budget.budget(full=200, quick=40)
    pretrained = nlp.load_text_model(pretrained=True)
    scratch = nlp.load_text_model(pretrained=False, seed=0)
    print(f"# text attacks on MiniLM-L6, {len(chosen)} sentences; DLG steps: {steps_scratch} (random init), {steps_pre} (pretrained)")
    print(f"# {machine()}\n")
    head = "| # | tokens | bag recall | bag precision | span token acc | span exact | span time (s) | DLG random: token acc | ROUGE-1 | ROUGE-2 | time (s) |"
    head += " DLG pretrained plain: token acc | ROUGE-1 | pretrained bag + span prior: token acc | ROUGE-1 | ROUGE-2 | time (s) |"
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    print("\n".join(lines))
    start = time.perf_counter()
    for i in chosen:
        sentence = nlp.SAMPLE_SENTENCES[i]
        ids = pretrained.encode(sentence)["input_ids"][0]
        grads = nlp.text_gradient(pretrained, sentence, 1)
        bag = set(ta.bag_of_words(grads, pretrained).ids.tolist())
        truth = set(ids.tolist())
        recall, precision = len(bag & truth) / len(truth), len(bag & truth) / max(len(bag), 1)
        span = ta.span_recover(grads, pretrained)
        span_acc = metrics.token_accuracy(span.ids, ids)
        exact = span.ids.tolist() == ids.tolist()
        grads_s = nlp.text_gradient(scratch, sentence, 1)
        rand = _dlg(scratch, grads_s, ids, steps_scratch)
        cells = [i, len(ids), f"{recall:.2f}", f"{precision:.2f}", f"{span_acc:.0%}", "yes" if exact else "no", f"{span.seconds:.2f}",
                 f"{rand['acc']:.0%}", f"{rand['r1']:.2f}", f"{rand['r2']:.2f}", f"{rand['s']:.1f}"]
        if args.no_pretrained_dlg:
            cells += ["-"] * 6
        else:
            plain = _dlg(pretrained, grads, ids, steps_pre, parametrization="embedding", decode="bag")
            prior = _dlg(pretrained, grads, ids, steps_pre, parametrization="bag", span_weight=1000.0, lr=0.3)
            cells += [f"{plain['acc']:.0%}", f"{plain['r1']:.2f}", f"{prior['acc']:.0%}", f"{prior['r1']:.2f}", f"{prior['r2']:.2f}", f"{prior['s']:.1f}"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
        print(lines[-1], flush=True)
    total = time.perf_counter() - start
    path = write_table("text_attacks", "Text leaks on MiniLM-L6", lines,
                       f"DLG steps: {steps_scratch} (random init), {steps_pre} (pretrained); {'quick' if budget.is_quick() else 'full'} budget; {total:.0f} s in all.")
    print(f"wrote {path}\n# total time {total:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
