"""`onepeace-hf classify`: zero-shot classification of images or audio files against text labels.

Each label is put into --template (default "{}", the label as it is; e.g. "a photo of {}" or "the sound of {}")
and embedded as a text. A file's label probabilities are the softmax over the labels of
`logit_scale * cosine(file, label text)`, the model's own temperature, as in its contrastive training.
"""

from pathlib import Path

import torch

from .common import CliError, add_model_argument, add_subcommand, load_model, positive_int, show_progress
from .embedding import add_skip_argument, embed_inputs, embed_readable
from .inputs import add_input_arguments, inputs_from_args, read_list_file


def add_parser(subparsers) -> None:
    parser = add_subcommand(
        subparsers, "classify", "zero-shot classification of images or audio against --labels", __doc__,
    )
    add_input_arguments(parser, modalities=("image", "audio"))
    parser.add_argument("--labels", nargs="+", action="extend", default=[], help="candidate labels (two or more)")
    parser.add_argument("--labels-list", action="append", default=[], metavar="FILE",
                        help="file with one candidate label per line (e.g. a dataset's class names); repeatable")
    parser.add_argument("--template", default="{}", help='prompt with one "{}" for the label (default "{}")')
    parser.add_argument("--top-k", type=positive_int, default=None, help="labels shown per file (default: all)")
    parser.add_argument("--batch-size", type=positive_int, default=32, help="inputs per forward pass (default 32)")
    add_skip_argument(parser)
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    add_model_argument(parser)
    parser.set_defaults(run=run)


def prompts(labels: list[str], template: str) -> list[str]:
    if template.count("{}") != 1:
        raise CliError(f'--template must contain "{{}}" exactly once, got {template!r}')
    if len(labels) < 2:
        raise CliError("give at least two --labels (or a --labels-list): probabilities over one label are always 1")
    if len(set(labels)) != len(labels):
        raise CliError(f"--labels must be distinct, got {labels}")
    if not all(label.strip() for label in labels):
        raise CliError(f"--labels must not be empty or blank, got {labels}")
    return [template.replace("{}", label) for label in labels]


def label_probabilities(model, file_embeddings: torch.Tensor, label_embeddings: torch.Tensor) -> torch.Tensor:
    """(files, labels) softmax of `logit_scale * cosine`; both inputs L2-normalized."""
    with torch.no_grad():
        scale = model.clamped_logit_scale().float().cpu()
    return torch.softmax(scale * file_embeddings @ label_embeddings.T, dim=-1)


def run(args) -> int:
    labels = args.labels + [line for path in args.labels_list for line in read_list_file(Path(path))]
    texts = prompts(labels, args.template)
    inputs = inputs_from_args(args, modalities=("image", "audio"))
    present = inputs.present()
    if not present:
        raise CliError("nothing to classify: give --image or --audio files (or a --*-list file)")
    progress = show_progress(args.quiet)
    model, processor = load_model(args.model, ["text", *present], args.device, progress)
    label_embeddings = embed_inputs(model, processor, "text", texts, args.batch_size, progress)
    width = max(len(label) for label in labels)
    shown = len(labels) if args.top_k is None else min(args.top_k, len(labels))
    for modality in present:
        embeddings, kept, _ = embed_readable(model, processor, modality, inputs.values[modality], args.batch_size,
                                             progress, args.skip_unreadable)
        probabilities = label_probabilities(model, embeddings, label_embeddings)
        for name, row in zip(map(str, kept), probabilities):
            order = torch.sort(row, descending=True, stable=True).indices[:shown].tolist()
            print(f"{name}: {labels[order[0]]}")
            for index in order:
                print(f"  {labels[index]:<{width}}  {row[index].item():.4f}")
    return 0
