"""`onepeace-hf demo`: cross-modal retrieval with the shipped model on the digits test split, in numbers and pictures.

Prints recall by class (a query counts as right at k when one of its k most similar candidates shows the same digit)
for text->image, text->audio and audio->image, with the chance level beside it: audio->image is emergent, as the
model never saw an audio-image pair (image and audio were each trained against text only). Then a few example
queries with their top results, and writes into --output-dir: retrieval_grid.png (each example query and its
results, green frame = same digit, red = another) and heatmap_text_image.png / heatmap_audio_image.png (cosine
similarity of the class-averaged embeddings; the outlined cell is each row's best).
"""

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from ..pictures import retrieval_grid, similarity_heatmap
from ..retrieval_metrics import retrieval_recall
from .common import CliError, add_model_argument, add_subcommand, load_model, positive_int, show_progress
from .common import prepare_output
from .embedding import embed_inputs
from .grid_items import grid_item


SPLIT = Path("data") / "digits" / "test"
# Editable install or source tree: src/onepeace_hf/cli/demo.py -> the repository root is three folders up.
REPO_ROOT = Path(__file__).resolve().parents[3]
KS = (1, 5)
DIRECTIONS = (("text", "image"), ("text", "audio"), ("audio", "image"))
FIELDS = ("id", "label", "label_name", "modality", "file", "caption")


def add_parser(subparsers) -> None:
    parser = add_subcommand(
        subparsers, "demo", "retrieval accuracy, example queries and pictures on the digits test split", __doc__,
    )
    parser.add_argument("--data", type=Path, default=None,
                        help=f"a split folder with metadata.jsonl, images/ and audio/ (default: {SPLIT} of the "
                             "source checkout this package runs from, else of the current folder)")
    parser.add_argument("--output-dir", type=Path, default=Path("onepeace_demo"),
                        help="where the pictures go (default: ./onepeace_demo)")
    parser.add_argument("--top-k", type=positive_int, default=5, help="results shown per example query (default 5)")
    parser.add_argument("--batch-size", type=positive_int, default=32, help="inputs per forward pass (default 32)")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    add_model_argument(parser)
    parser.set_defaults(run=run)


def default_data_dir() -> Path:
    for root in (REPO_ROOT, Path.cwd()):
        if (root / SPLIT / "metadata.jsonl").is_file():
            return root / SPLIT
    raise CliError(
        f"the digits test split is not in {REPO_ROOT / SPLIT} nor {Path.cwd() / SPLIT}; pass --data FOLDER "
        "(a split folder with metadata.jsonl)"
    )


def read_split(folder: Path) -> dict[str, list[dict]]:
    """The split's rows by modality ("image", "audio"), file paths made absolute, every field and file checked."""
    metadata = folder / "metadata.jsonl"
    if not metadata.is_file():
        raise CliError(f"{folder} is not a data split (no metadata.jsonl)")
    rows = {"image": [], "audio": []}
    for number, line in enumerate(metadata.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise CliError(f"{metadata}:{number} is not JSON ({error.msg})") from None
        missing = [name for name in FIELDS if name not in row] if isinstance(row, dict) else list(FIELDS)
        if missing:
            raise CliError(f"{metadata}:{number} lacks the fields {missing} (each line: an object with {FIELDS})")
        if row["modality"] not in rows:
            raise CliError(f"{metadata}:{number} has modality {row['modality']!r}; the demo reads image and audio")
        row["path"] = folder / row["file"]
        if not row["path"].is_file():
            raise CliError(f"{metadata}:{number} names {row['file']}, which does not exist")
        rows[row["modality"]].append(row)
    for modality, found in rows.items():
        if not found:
            raise CliError(f"{metadata} has no {modality} items; the demo needs images and audio")
    return rows


def chance_recall(query_labels: list[int], candidate_labels: list[int], k: int) -> float:
    """Expected R@k (percent) of a ranking in random order: 1 - C(n - m, k) / C(n, k) per query, m = its matches."""
    n, k = len(candidate_labels), min(k, len(candidate_labels))
    totals = [1 - math.comb(n - candidate_labels.count(label), k) / math.comb(n, k) for label in query_labels]
    return 100.0 * sum(totals) / len(totals)


def recall_by_class(queries, query_labels, candidates, candidate_labels) -> tuple[dict, dict, int]:
    """Measured and chance R@k over the queries whose digit is among the candidates (the others cannot score)."""
    keep = [i for i, label in enumerate(query_labels) if label in candidate_labels]
    if not keep:
        raise CliError("no query digit appears among the candidates; the split is too small to measure recall")
    labels = [query_labels[i] for i in keep]
    matches = [[j for j, c in enumerate(candidate_labels) if c == label] for label in labels]
    measured = retrieval_recall(queries[keep], candidates, matches, ks=KS)
    chance = {f"R@{k}": chance_recall(labels, candidate_labels, k) for k in KS}
    return measured, chance, len(keep)


def class_means(embeddings: torch.Tensor, labels: list[int], classes: list[int]) -> torch.Tensor:
    return F.normalize(torch.stack([embeddings[[i for i, c in enumerate(labels) if c == k]].mean(0) for k in classes]),
                       dim=-1)


def example_queries(rows, names) -> list[tuple[str, object, str, int]]:
    """(query modality, text or row, candidate modality, digit): two text->image, one text->audio, two
    audio->image, on digits present on both sides so that every row can show a right answer."""
    image_labels = {row["label"] for row in rows["image"]}
    audio_labels = {row["label"] for row in rows["audio"]}
    both = sorted(image_labels & audio_labels)
    picks = [label for label in (3, 7) if label in both] or both[:2]
    examples = [("text", f"the digit {label}", "image", label) for label in picks]
    if picks:
        examples.append(("text", f"someone saying {names[picks[-1]]}", "audio", picks[-1]))
    spoken = [label for label in (5, 8) if label in both] or both[-2:]
    for label in spoken:
        row = next(row for row in rows["audio"] if row["label"] == label)
        examples.append(("audio", row, "image", label))
    return examples


def print_recall(captions, embeds, labels) -> None:
    print("Retrieval by class (percent; a hit = a result showing the same digit)")
    print(f"  {'direction':<15}{'R@1':>7}{'R@5':>7}   {'chance R@1':>10}{'R@5':>7}   queries")
    for source, target in DIRECTIONS:
        # Text queries are the captions of the target items; audio queries are the clips themselves.
        queries, query_labels = (captions[target], labels[target]) if source == "text" else (embeds[source],
                                                                                              labels[source])
        measured, chance, count = recall_by_class(queries, query_labels, embeds[target], labels[target])
        note = "  (emergent: never trained on audio-image pairs)" if (source, target) == ("audio", "image") else ""
        print(f"  {source + ' -> ' + target:<15}{measured['R@1']:7.1f}{measured['R@5']:7.1f}   "
              f"{chance['R@1']:10.1f}{chance['R@5']:7.1f}   {count:>7}{note}")


def show_examples(rows, embeds, names, embed_text, top_k: int):
    """Print the example queries' top results; return them as grid cells (queries, rows of results)."""
    grid_queries, grid_rows = [], []
    print(f"\nExample queries (top {top_k}; * = same digit)")
    for query_modality, query, target, label in example_queries(rows, names):
        if query_modality == "text":
            vector, shown = embed_text([query]), repr(query)
            grid_queries.append(grid_item("text", query, label="text"))
        else:
            index = rows["audio"].index(query)
            vector, shown = embeds["audio"][index : index + 1], f"audio {query['file']} ({query['caption']!r})"
            grid_queries.append(grid_item("audio", query["path"], label=f"{query['id'][-4:]} {query['label_name']}"))
        scores = (vector @ embeds[target].T)[0]
        order = torch.sort(scores, descending=True, stable=True).indices[:top_k].tolist()
        print(f"  {query_modality} -> {target}: {shown}")
        results = []
        for candidate in order:
            item, score = rows[target][candidate], scores[candidate].item()
            hit = item["label"] == label
            print(f"    {'*' if hit else ' '} {score:.3f}  {item['id']}  ({item['label_name']})")
            results.append(grid_item(target, item["path"], label=f"{item['id'][-4:]} {item['label_name']}",
                                     score=score, correct=hit))
        grid_rows.append(results)
    return grid_queries, grid_rows


def write_pictures(output_dir: Path, grid, captions, embeds, labels, names) -> list[Path]:
    written = [output_dir / "retrieval_grid.png"]
    retrieval_grid(*grid, title="ONE-PEACE retrieval on the digits test split").save(written[0])
    image_classes = sorted(set(labels["image"]))
    image_means = class_means(embeds["image"], labels["image"], image_classes)
    columns = [f"image {names[c]}" for c in image_classes]
    for source, row_embeds, row_labels in (("text", captions["image"], labels["image"]),
                                           ("audio", embeds["audio"], labels["audio"])):
        classes = sorted(set(row_labels))
        matrix = class_means(row_embeds, row_labels, classes) @ image_means.T
        what = "captions" if source == "text" else "spoken digits (emergent)"
        picture = similarity_heatmap(matrix, [f"{source} {names[c]}" for c in classes], columns,
                                     title=f"{what} x images: cosine of class means")
        written.append(output_dir / f"heatmap_{source}_image.png")
        picture.save(written[-1])
    return written


def run(args) -> int:
    folder = args.data if args.data is not None else default_data_dir()
    rows = read_split(folder)
    prepare_output(args.output_dir, folder=True)
    progress = show_progress(args.quiet)
    model, processor = load_model(args.model, ["text", "image", "audio"], args.device, progress)

    def embed(modality, values):
        return embed_inputs(model, processor, modality, values, args.batch_size, progress)

    embeds = {m: embed(m, [row["path"] for row in rows[m]]) for m in ("image", "audio")}
    captions = {m: embed("text", [row["caption"] for row in rows[m]]) for m in ("image", "audio")}
    labels = {m: [row["label"] for row in rows[m]] for m in ("image", "audio")}
    names = {row["label"]: row["label_name"] for m in rows for row in rows[m]}

    print(f"ONE-PEACE model {args.model}")
    print(f"data {folder}: {len(rows['image'])} images, {len(rows['audio'])} audio clips, {len(names)} digits\n")
    print_recall(captions, embeds, labels)
    grid = show_examples(rows, embeds, names, lambda texts: embed("text", texts), args.top_k)
    try:
        written = write_pictures(args.output_dir, grid, captions, embeds, labels, names)
    except OSError as error:
        raise CliError(f"cannot write the pictures in {args.output_dir} ({error.strerror or error})", 1) from None
    print("\nWrote " + ", ".join(str(path) for path in written))
    return 0
