"""`onepeace-hf rank`: rank candidates of one modality for queries of any modality, including combined queries.

Queries come from --query-text / --query-image / --query-audio. With one of them, every value is its own query.
With several, they are combined position by position into one query each, as the original demo's audio+image and
image+text searches: each part's embedding is L2-normalized, the parts are summed with --weights (default equal)
and the sum is normalized again (`onepeace_hf.combine_embeddings`). Every query modality then needs the same number
of values, or a single value that joins every query.
"""

from pathlib import Path

from ..queries import combine_embeddings, rank_candidates
from .common import CliError, add_model_argument, add_subcommand, load_model, positive_int, show_progress
from .common import prepare_output
from .embedding import add_skip_argument, embed_inputs, embed_readable
from .grid_items import combined_item, grid_item
from .inputs import add_input_arguments, inputs_from_args


def add_parser(subparsers) -> None:
    parser = add_subcommand(
        subparsers, "rank", "rank candidates (texts, images or audio) for queries, combined queries included", __doc__,
    )
    add_input_arguments(parser, prefix="query-", role="query")
    add_input_arguments(parser, role="candidate")
    parser.add_argument("--weights", type=float, nargs="+", metavar="W",
                        help="weights of the query parts of a combined query, in the order text, image, audio "
                             "(of those given); default: equal")
    parser.add_argument("--top-k", type=positive_int, default=5, help="results shown per query (default 5)")
    parser.add_argument("--grid", type=Path, help="also write a picture of the results (PNG)")
    parser.add_argument("--grid-font", type=Path, metavar="FILE",
                        help="TrueType/OpenType font for the picture's text (default: Pillow's, or a system font "
                             "for characters it lacks)")
    parser.add_argument("--batch-size", type=positive_int, default=32, help="inputs per forward pass (default 32)")
    add_skip_argument(parser, "candidate files")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    add_model_argument(parser)
    parser.set_defaults(run=run)


def plan_queries(queries) -> tuple[list[str], int]:
    """The query modalities and the number of queries, after checking that the counts line up."""
    modalities = queries.present()
    if not modalities:
        raise CliError("no query: give --query-text, --query-image or --query-audio")
    counts = {m: len(queries.values[m]) for m in modalities}
    many = {count for count in counts.values() if count > 1}
    if len(many) > 1:
        described = ", ".join(f"{count} {m}" for m, count in counts.items())
        raise CliError(f"combined queries need the same number of values per modality (or one), got {described}")
    return modalities, (many.pop() if many else 1) if len(modalities) > 1 else counts[modalities[0]]


def check_font(path: Path) -> None:
    """A `CliError` now, before any model loads, for a --grid-font Pillow cannot use."""
    from PIL import ImageFont  # noqa: PLC0415

    try:
        ImageFont.truetype(path, 11)
    except OSError as error:
        raise CliError(f"--grid-font {path}: not a font file Pillow can use ({error})") from None


def describe(parts) -> str:
    return " + ".join(f"{m} {value!r}" if m == "text" else f"{m} {value}" for m, value in parts)


def run(args) -> int:
    if args.grid is not None and args.grid.suffix.lower() != ".png":
        raise CliError(f"--grid writes a PNG picture; name it *.png, not {args.grid.name}")
    if args.grid is not None:
        prepare_output(args.grid)
    if args.grid_font is not None:
        check_font(args.grid_font)
    queries = inputs_from_args(args, prefix="query_")
    candidates = inputs_from_args(args)
    query_modalities, num_queries = plan_queries(queries)
    candidate_modalities = candidates.present()
    if len(candidate_modalities) != 1:
        raise CliError(
            "give candidates of exactly one modality (--text, --image or --audio), got "
            f"{', '.join(candidate_modalities) or 'none'}"
        )
    (candidate_modality,) = candidate_modalities
    if args.weights is not None and len(args.weights) != len(query_modalities):
        raise CliError(f"--weights needs one weight per query modality ({', '.join(query_modalities)}), "
                       f"got {len(args.weights)}")

    progress = show_progress(args.quiet)
    model, processor = load_model(args.model, [*query_modalities, candidate_modality], args.device, progress)

    def embed(inputs, modality):
        return embed_inputs(model, processor, modality, inputs.values[modality], args.batch_size, progress)

    parts = {m: embed(queries, m) for m in query_modalities}
    # A modality with one value joins every query: repeat it to the number of queries.
    parts = {m: e.expand(num_queries, -1) if len(e) == 1 else e for m, e in parts.items()}
    try:
        query = combine_embeddings(*parts.values(), weights=args.weights)
    except ValueError as error:
        raise CliError(str(error)) from None
    gallery, values, _ = embed_readable(model, processor, candidate_modality, candidates.values[candidate_modality],
                                        args.batch_size, progress, args.skip_unreadable)
    ranking = rank_candidates(query, gallery, top_k=args.top_k)

    names = [str(value) for value in values]
    query_parts = [
        [(m, queries.values[m][0 if len(queries.values[m]) == 1 else i]) for m in query_modalities]
        for i in range(num_queries)
    ]
    for i, query_part in enumerate(query_parts):
        print(f"query {i + 1}: {describe(query_part)}")
        for rank, (index, score) in enumerate(zip(ranking.indices[i].tolist(), ranking.scores[i].tolist()), 1):
            print(f"  {rank:>3}. {score:7.4f}  {names[index]}")
    if args.grid is not None:
        from ..pictures import retrieval_grid  # noqa: PLC0415

        rows = [
            [grid_item(candidate_modality, values[index], score=score)
             for index, score in zip(ranking.indices[i].tolist(), ranking.scores[i].tolist())]
            for i in range(num_queries)
        ]
        picture = retrieval_grid([combined_item(parts) for parts in query_parts], rows,
                                 title=f"{' + '.join(query_modalities)} -> {candidate_modality}", font=args.grid_font)
        try:
            picture.save(args.grid)
        except OSError as error:
            raise CliError(f"cannot write {args.grid} ({error.strerror or error})", exit_code=1) from None
        print(f"Wrote {args.grid}")
    return 0

