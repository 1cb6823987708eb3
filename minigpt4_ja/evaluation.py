"""`python -m minigpt4_ja evaluate`: answer a VQA-style set and score the answers.

Data: JSONL rows `{"image", "question", "answer"}` (`answer` may be a list of accepted answers), the Japanese Visual
Genome VQA layout, or any other layout `train` reads (each turn is scored on its own, without earlier turns).

Metrics, each a fraction in [0, 1]:
- exact match, after normalisation (NFKC, punctuation and spaces removed, lowercase);
- ROUGE-L F1 over characters (the usual choice for Japanese, which has no spaces), best over the references;
- yes/no accuracy on the items whose gold answer is はい/いいえ/yes/no (MME-style 「はい」か「いいえ」 questions): the first
  はい/いいえ/yes/no in the prediction is its answer; a prediction with none counts as wrong.

Greedy decoding (temperature 0) is reported on its own; `--seeds K` adds K sampled runs (seeds 0..K-1, or from
`--seed`) and reports each metric's mean with a 95% confidence interval from the t-distribution. Every image is
encoded once per run, however many questions and seeds use it.
"""

from __future__ import annotations

import json
import math
import re
import sys
import time
import unicodedata
from dataclasses import dataclass, replace
from pathlib import Path

from .data import DEFAULT_IMAGE_PATTERN, FORMATS, load_dataset
from .errors import InputError

METRICS = ("exact_match", "rouge_l", "yes_no_accuracy")
METRIC_NAMES = {"exact_match": "exact match", "rouge_l": "ROUGE-L (char F1)", "yes_no_accuracy": "yes/no accuracy"}
YES, NO = "yes", "no"
_YES_NO_GOLD = {"はい": YES, "yes": YES, "いいえ": NO, "no": NO}
_YES_NO_PATTERN = re.compile(r"はい|いいえ|(?<![a-z])yes(?![a-z])|(?<![a-z])no(?![a-z])")


# ---------------------------------------------------------------- metrics

def normalize_answer(text: str) -> str:
    """NFKC, lowercase, and every punctuation mark and space removed: 「はい。」 -> はい, ' Yes! ' -> yes."""
    text = unicodedata.normalize("NFKC", text or "").lower()
    return "".join(ch for ch in text if not (unicodedata.category(ch).startswith(("P", "Z")) or ch.isspace()))


def exact_match(prediction: str, references) -> float:
    references = [references] if isinstance(references, str) else list(references)
    predicted = normalize_answer(prediction)
    return float(any(predicted == normalize_answer(ref) for ref in references))


def lcs_length(a: str, b: str) -> int:
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for ch in a:
        current = [0]
        for j, other in enumerate(b, start=1):
            current.append(previous[j - 1] + 1 if ch == other else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, reference: str, normalize: bool = True) -> float:
    """Character-level ROUGE-L F1: with L the longest common subsequence, P = L/len(pred), R = L/len(ref)."""
    if normalize:
        prediction, reference = normalize_answer(prediction), normalize_answer(reference)
    if not prediction or not reference:
        return float(prediction == reference)
    common = lcs_length(prediction, reference)
    if common == 0:
        return 0.0
    precision, recall = common / len(prediction), common / len(reference)
    return 2 * precision * recall / (precision + recall)


def best_rouge_l(prediction: str, references) -> float:
    references = [references] if isinstance(references, str) else list(references)
    return max(rouge_l(prediction, ref) for ref in references)


def gold_yes_no(answer: str) -> str | None:
    """'yes'/'no' when the gold answer is exactly はい/いいえ/yes/no (after normalisation), else None."""
    return _YES_NO_GOLD.get(normalize_answer(answer))


def parse_yes_no(prediction: str) -> str | None:
    """The first はい/いいえ/yes/no in a prediction ('いいえ、猫です' -> no; 'Yes, it is.' -> yes), else None."""
    text = unicodedata.normalize("NFKC", prediction or "").lower()
    match = _YES_NO_PATTERN.search(text)
    if match is None:
        return None
    return _YES_NO_GOLD[match.group(0)]


# ---------------------------------------------------------------- confidence intervals

def _log_beta(a: float, b: float) -> float:
    return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """Lentz's method for the continued fraction of the regularised incomplete beta function."""
    tiny, epsilon = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 500):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= c * d
        if abs(c * d - 1.0) < epsilon:
            break
    return result


def regularized_incomplete_beta(a: float, b: float, x: float) -> float:
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(a * math.log(x) + b * math.log1p(-x) - _log_beta(a, b))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _beta_continued_fraction(a, b, x) / a
    return 1.0 - front * _beta_continued_fraction(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """Student's t cumulative distribution function."""
    tail = 0.5 * regularized_incomplete_beta(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(probability: float, df: float) -> float:
    """Inverse of `t_cdf` (bisection to ~1e-12): t_quantile(0.975, 4) = 2.776."""
    if not 0.0 < probability < 1.0:
        raise ValueError("probability must be strictly between 0 and 1")
    if probability < 0.5:
        return -t_quantile(1.0 - probability, df)
    low, high = 0.0, 1.0
    while t_cdf(high, df) < probability:
        high *= 2.0
    for _ in range(200):
        middle = (low + high) / 2.0
        if t_cdf(middle, df) < probability:
            low = middle
        else:
            high = middle
        if high - low < 1e-12:
            break
    return (low + high) / 2.0


def mean_confidence_interval(values, confidence: float = 0.95) -> dict:
    """Mean, sample standard deviation and the t-based confidence interval of the mean (None for n < 2)."""
    values = [float(v) for v in values]
    n = len(values)
    if n == 0:
        return {"n": 0, "mean": None, "std": None, "half_width": None, "low": None, "high": None, "values": []}
    mean = sum(values) / n
    if n < 2:
        return {"n": 1, "mean": mean, "std": None, "half_width": None, "low": None, "high": None, "values": values}
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile(0.5 + confidence / 2.0, n - 1) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "half_width": half, "low": mean - half, "high": mean + half,
            "values": values}


# ---------------------------------------------------------------- scoring a run

@dataclass
class Item:
    image: Path | None
    question: str
    references: tuple[str, ...]
    source: str


def score_run(items: list[Item], predictions: list[str]) -> dict:
    """Every metric for one run (one decoding setting over all items)."""
    exact = [exact_match(p, item.references) for item, p in zip(items, predictions)]
    rouge = [best_rouge_l(p, item.references) for item, p in zip(items, predictions)]
    yes_no, unparsed = [], 0
    for item, prediction in zip(items, predictions):
        gold = gold_yes_no(item.references[0])
        if gold is None:
            continue
        predicted = parse_yes_no(prediction)
        unparsed += predicted is None
        yes_no.append(float(predicted == gold))
    return {
        "items": len(items),
        "exact_match": sum(exact) / len(exact) if exact else None,
        "rouge_l": sum(rouge) / len(rouge) if rouge else None,
        "yes_no_accuracy": sum(yes_no) / len(yes_no) if yes_no else None,
        "yes_no_items": len(yes_no),
        "yes_no_unparsed": unparsed,
    }


def load_items(paths: list[str], image_roots: list[str] | None, data_format: str = "auto",
               image_pattern: str = DEFAULT_IMAGE_PATTERN) -> tuple[list[Item], list]:
    roots = list(image_roots or [])
    if len(roots) > 1 and len(roots) != len(paths):
        raise InputError(f"{len(paths)} --data files but {len(roots)} --image-root folders")
    items, reports = [], []
    for index, path in enumerate(paths):
        root = roots[index] if len(roots) > 1 else (roots[0] if roots else None)
        examples, report = load_dataset(path, root, data_format, image_pattern)
        reports.append(report)
        for example in examples:
            for number, turn in enumerate(example.turns):
                image = example.images[0] if example.images else None
                source = example.source + (f" turn {number + 1}" if len(example.turns) > 1 else "")
                items.append(Item(image, turn.question, turn.all_answers, source))
    return items, reports


# ---------------------------------------------------------------- command line

def add_arguments(parser) -> None:
    from .cli import add_generation_options, add_model_options

    add_model_options(parser)
    data = parser.add_argument_group("data")
    data.add_argument("--data", action="append", required=True, metavar="FILE",
                      help="VQA JSONL ({image, question, answer}) or Japanese Visual Genome VQA JSON (repeatable)")
    data.add_argument("--image-root", action="append", metavar="DIR", help="default: the data file's folder")
    data.add_argument("--data-format", default="auto", choices=("auto", *FORMATS))
    data.add_argument("--image-pattern", default=DEFAULT_IMAGE_PATTERN)
    data.add_argument("--limit", type=int, metavar="N", help="score only the first N items (a quick run)")
    run = parser.add_argument_group("evaluation")
    run.add_argument("--seeds", type=int, default=0, metavar="K",
                     help="also run K sampled passes (seeds --seed .. --seed+K-1, default from 0) and report "
                          "mean ± 95%% CI; greedy is always reported")
    run.add_argument("--out", metavar="FILE", help="write the JSON report (metrics, settings, every prediction)")
    add_generation_options(parser)
    parser.set_defaults(max_new_tokens=128)


def main(args) -> int:
    report = evaluate(args)
    print(markdown_table(report))
    if args.out:
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


def evaluate(args, pipeline=None) -> dict:
    """Run the evaluation the CLI describes and return the report (also written to --out)."""
    from tqdm.auto import tqdm

    from .cli import generation_settings, load_from_args

    if args.limit is not None and args.limit < 1:
        raise InputError(f"--limit must be at least 1, got {args.limit}")
    if args.seeds < 0:
        raise InputError(f"--seeds must be 0 or more, got {args.seeds}")
    items, reports = load_items(args.data, args.image_root, args.data_format, args.image_pattern)
    for report in reports:
        print(report.describe(), file=sys.stderr)
    if args.limit is not None:
        items = items[:args.limit]
    sampled = generation_settings(args)
    greedy = replace(sampled, temperature=0.0, seed=None).validated()
    base_seed = args.seed or 0
    seeds = [base_seed + k for k in range(args.seeds)]
    if seeds and sampled.greedy:
        print("note: --temperature 0 makes every seeded run greedy; the confidence interval will be zero",
              file=sys.stderr)
    if pipeline is None:
        pipeline = load_from_args(args)

    # Image-major: each image is encoded once, then every question about it is asked in every setting.
    by_image: dict = {}
    for index, item in enumerate(items):
        by_image.setdefault(item.image, []).append(index)
    runs = [("greedy", greedy)] + [(f"seed {s}", replace(sampled, seed=s)) for s in seeds]
    predictions = {name: [""] * len(items) for name, _ in runs}
    unreadable: dict[int, str] = {}
    encoded = 0
    started = time.time()
    bar = tqdm(total=len(items) * len(runs), desc="evaluate", unit="answer", file=sys.stderr)
    for image, indexes in by_image.items():
        embedding = None
        if image is not None:
            try:
                embedding = pipeline.encode_image(image)
                encoded += 1
            except InputError as err:
                for index in indexes:
                    unreadable[index] = str(err)
                bar.update(len(indexes) * len(runs))
                continue
        for index in indexes:
            for name, settings in runs:
                predictions[name][index] = pipeline.ask(embedding, items[index].question, settings).text
                bar.update(1)
    bar.close()

    kept = [i for i in range(len(items)) if i not in unreadable]
    if not kept:
        raise InputError("no item could be evaluated: every image was unreadable (" +
                         "; ".join(list(unreadable.values())[:3]) + ")")
    scored_items = [items[i] for i in kept]
    greedy_scores = score_run(scored_items, [predictions["greedy"][i] for i in kept])
    per_seed = [score_run(scored_items, [predictions[f"seed {s}"][i] for i in kept]) for s in seeds]
    sampled_summary = None
    if seeds:
        sampled_summary = {"seeds": seeds, "settings": sampled.to_dict(), "per_seed": per_seed}
        for metric in METRICS:
            values = [run[metric] for run in per_seed if run[metric] is not None]
            sampled_summary[metric] = mean_confidence_interval(values)
    report = {
        "format": "minigpt4_ja evaluation",
        "model": pipeline.description,
        "projection": getattr(args, "projection", None),
        "data": [r.to_dict() for r in reports],
        "items": len(kept),
        "limit": args.limit,
        "images_encoded": encoded,
        "unreadable": {"count": len(unreadable),
                       "first": [f"{items[i].source}: {e}" for i, e in list(unreadable.items())[:5]]},
        "greedy": {"settings": greedy.to_dict(), **greedy_scores},
        "sampled": sampled_summary,
        "confidence": 0.95,
        "predictions": [
            {"source": items[i].source, "image": str(items[i].image) if items[i].image else None,
             "question": items[i].question, "references": list(items[i].references),
             "greedy": predictions["greedy"][i],
             **({"samples": [predictions[f"seed {s}"][i] for s in seeds]} if seeds else {})}
            for i in kept
        ],
        "elapsed_s": round(time.time() - started, 2),
    }
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1, ensure_ascii=False), encoding="utf-8")
    return report


def _percent(value) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}"


def markdown_table(report: dict) -> str:
    """The report as a Markdown table: metrics in %, greedy and (with --seeds) sampled mean ± 95% CI."""
    sampled = report.get("sampled")
    greedy = report["greedy"]
    header = "| metric (%) | greedy |"
    rule = "|---|---:|"
    if sampled:
        header += f" sampled, mean ± 95% CI ({len(sampled['seeds'])} seeds) |"
        rule += "---:|"
    lines = [f"{report['items']} items, {report['images_encoded']} images, model: {report['model']}", "", header, rule]
    for metric in METRICS:
        name = METRIC_NAMES[metric]
        if metric == "yes_no_accuracy":
            name += f" (n={greedy['yes_no_items']})"
        row = f"| {name} | {_percent(greedy[metric])} |"
        if sampled:
            stats = sampled[metric]
            if stats["mean"] is None:
                row += " n/a |"
            elif stats["half_width"] is None:
                row += f" {_percent(stats['mean'])} (one seed: no interval) |"
            else:
                row += f" {_percent(stats['mean'])} ± {100 * stats['half_width']:.2f} |"
        lines.append(row)
    if report["unreadable"]["count"]:
        lines += ["", f"{report['unreadable']['count']} items skipped: unreadable image"]
    return "\n".join(lines)
