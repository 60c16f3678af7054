"""Checking a converted model against outputs recorded with the original implementation.

An expected-outputs file is a safetensors file laid out as `../shared/reference/expected_tiny_*.safetensors`:
recorded inputs (`inputs.src_tokens`, `inputs.src_images`, `inputs.src_audios`, `inputs.audio_padding_masks`,
`vl.src_tokens`, `al.src_tokens`) and outputs named after what the original returns (`text.embedding`,
`image.hidden`, `vl.text_hidden`, `logits`, `image.layer_out.3`, ...). Inputs may come from a second file (the
classification fixture reuses the pretraining fixture's images; its `src_images_sha256` metadata pins them).
conversion/README.md says how a maintainer records such a file with the original code.
"""

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open


PAD_TOKEN_ID = 1
# Default (atol, rtol) by the dtype the weights were saved in: an output passes where |actual - expected| <=
# atol + rtol * |expected| everywhere. The model always runs in float32; half-precision weights alone move the
# tiny reference model's outputs by up to ~0.09 (bf16), hence the wide defaults there.
DEFAULT_TOLERANCES = {torch.float32: (1e-4, 0.0), torch.bfloat16: (1e-1, 5e-2), torch.float16: (2e-2, 1e-2)}


class OutputMismatchError(AssertionError):
    """The converted model's outputs differ from the recorded ones; the message lists each comparison."""


@dataclass
class OutputCheck:
    name: str
    max_abs_error: float
    passed: bool


@dataclass
class VerificationReport:
    expected_file: str
    atol: float
    rtol: float
    checks: list[OutputCheck] = field(default_factory=list)
    not_compared: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(check.passed for check in self.checks)

    @property
    def max_abs_error(self) -> float:
        return max((check.max_abs_error for check in self.checks), default=float("nan"))

    def summary(self) -> str:
        lines = [f"{check.name}: max abs error {check.max_abs_error:.3g} ({'ok' if check.passed else 'FAILED'})"
                 for check in self.checks]
        if self.not_compared:
            lines.append(f"recorded but not produced by this model: {', '.join(self.not_compared)}")
        return "\n".join(lines)


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not path.is_file():
        raise FileNotFoundError(f"No recorded outputs file at {path}.")
    try:
        with safe_open(path, "pt") as file:
            return {key: file.get_tensor(key) for key in file.keys()}, file.metadata() or {}
    except SafetensorError as error:
        raise OutputMismatchError(
            f"{path} is not a safetensors file of recorded outputs ({error}); see conversion/README.md for how "
            "they are recorded with the original code."
        ) from None


def _is_input(key: str) -> bool:
    """Recorded inputs: `inputs.*` and the token ids of the joint passes (`vl.src_tokens`, `al.src_tokens`)."""
    return key.startswith("inputs.") or key.endswith(".src_tokens")


def _float32_sha256(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.to(torch.float32).contiguous().numpy().tobytes()).hexdigest()


def _sample_padding_mask(model, frame_mask: torch.Tensor, num_samples: int) -> torch.Tensor:
    """A per-sample mask (1 = real) giving the recorded per-frame mask: the shortest length with that many frames."""
    mask = torch.zeros(frame_mask.shape[0], num_samples, dtype=torch.long)
    for row, padded in enumerate(frame_mask):
        frames = int((~padded).sum()) - 1  # the CLS slot is never padded
        low, high = 1, num_samples
        while low < high:
            middle = (low + high) // 2
            low, high = (middle + 1, high) if model.config.audio_frame_count(middle) < frames else (low, middle)
        mask[row, :low] = 1
    return mask


def _model_outputs(model, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Run the model on the recorded inputs and name its outputs as the original's recorded ones."""
    from .modeling_onepeace import OnePeaceModel, OnePeaceVisionModel

    modalities = model.config.modalities
    tokens, images, audios = (inputs.get(f"inputs.{name}") for name in ("src_tokens", "src_images", "src_audios"))
    audio_kwargs = {}
    if audios is not None:
        audio_kwargs = {"input_values": audios,
                        "padding_mask": _sample_padding_mask(model, inputs["inputs.audio_padding_masks"], audios.shape[1])}
    given = {"text": tokens, "image": images, "audio": audios}
    outputs = {}
    if isinstance(model, OnePeaceVisionModel):
        if images is not None:
            result = model(pixel_values=images, output_hidden_states=True)
            outputs.update({f"image.layer_out.{i}": hidden for i, hidden in enumerate(result.hidden_states[1:])})
        return outputs
    if isinstance(model, OnePeaceModel):
        for modality in modalities:
            if given[modality] is None:
                continue
            kwargs = {"text": {"input_ids": tokens}, "image": {"pixel_values": images}, "audio": audio_kwargs}[modality]
            result = model(**kwargs, output_hidden_states=True)
            outputs[f"{modality}.embedding"] = getattr(result, f"{modality}_embeds")
            outputs[f"{modality}.hidden"] = getattr(result, f"{modality}_last_hidden_state")
            for i, hidden in enumerate(getattr(result, f"{modality}_hidden_states")[1:]):
                outputs[f"{modality}.layer_out.{i}"] = hidden
        if "text" in modalities:
            outputs["logit_scale_exp"] = model.clamped_logit_scale()
        if {"text", "image"} <= set(modalities) and "vl.src_tokens" in inputs and images is not None:
            result = model(input_ids=inputs["vl.src_tokens"], pixel_values=images, fusion=True)
            outputs["vl.text_hidden"], outputs["vl.image_hidden"] = (result.text_last_hidden_state,
                                                                     result.image_last_hidden_state)
        if {"text", "audio"} <= set(modalities) and "al.src_tokens" in inputs and audios is not None:
            result = model(input_ids=inputs["al.src_tokens"], **audio_kwargs, fusion=True)
            outputs["al.text_hidden"], outputs["al.audio_hidden"] = (result.text_last_hidden_state,
                                                                     result.audio_last_hidden_state)
        return outputs
    # A task model: its inputs are its branches' (joint models read the `vl` / `al` token ids).
    branches = list(model.input_modalities)
    kwargs = {}
    if "text" in branches:
        kwargs["input_ids"] = inputs.get(f"{'vl' if 'image' in branches else 'al'}.src_tokens", tokens)
    if "image" in branches:
        kwargs["pixel_values"] = images
    if "audio" in branches:
        kwargs.update(audio_kwargs)
    if any(value is None for value in kwargs.values()) or not kwargs:
        return outputs
    result = model(**kwargs)
    for name in ("logits", "pred_boxes"):
        if getattr(result, name, None) is not None:
            outputs[name] = getattr(result, name)
    if getattr(result, "last_hidden_state", None) is not None:
        outputs[f"{model.pooled_modality}.hidden"] = result.last_hidden_state
    return outputs


def read_recorded_inputs(
    expected_file: str | Path, inputs_file: str | Path | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The record and its inputs (from `inputs_file` where the record lacks them); raise if they are missing or
    are not the ones pinned by the record. Cheap: a conversion calls it before writing anything."""
    expected_file = Path(expected_file)
    expected, metadata = _read(expected_file)
    inputs = {key: value for key, value in expected.items() if _is_input(key)}
    if inputs_file is not None:
        extra, _ = _read(Path(inputs_file))
        inputs.update({key: value for key, value in extra.items() if _is_input(key) and key not in inputs})
    if not any(key.startswith("inputs.") for key in inputs):
        raise OutputMismatchError(
            f"{expected_file} records no inputs (inputs.*): give a record that does as the expected inputs "
            "(`expected_inputs=`, `--expected-inputs`; for the tiny reference classifiers, the pretraining record)."
        )
    pinned = metadata.get("src_images_sha256")
    if pinned is not None and ("inputs.src_images" not in inputs or _float32_sha256(inputs["inputs.src_images"]) != pinned):
        raise OutputMismatchError(f"The images given are not the ones {expected_file.name} was recorded with.")
    return expected, inputs


def verify_outputs(
    model,
    expected_file: str | Path,
    inputs_file: str | Path | None = None,
    atol: float | None = None,
    rtol: float | None = None,
) -> VerificationReport:
    """Compare the model's outputs on the recorded inputs with the recorded outputs; raise if any is off.

    Fails loudly when an output differs by more than `atol + rtol * |expected|` (defaults by weight dtype), when recorded inputs are missing or not the pinned
    ones, and when nothing recorded is something this model produces.
    """
    expected_file = Path(expected_file)
    expected, inputs = read_recorded_inputs(expected_file, inputs_file)
    default_atol, default_rtol = DEFAULT_TOLERANCES.get(model.dtype, DEFAULT_TOLERANCES[torch.float32])
    atol = default_atol if atol is None else atol
    rtol = default_rtol if rtol is None else rtol
    model = model.float().eval()
    with torch.no_grad():
        produced = _model_outputs(model, inputs)
    report = VerificationReport(expected_file=str(expected_file), atol=atol, rtol=rtol)
    for name, recorded in expected.items():
        if name in inputs or name.startswith(("inputs.", "pretrain.", "loss.")):
            continue
        if name not in produced:
            report.not_compared.append(name)
            continue
        actual = produced[name]
        if actual.shape != recorded.shape:
            report.checks.append(OutputCheck(name, float("inf"), False))
            continue
        difference = (actual.float() - recorded.float()).abs()
        error = difference.max().item() if actual.numel() else 0.0
        passed = bool((difference <= atol + rtol * recorded.float().abs()).all())
        report.checks.append(OutputCheck(name, error, passed))
    if not report.checks:
        raise OutputMismatchError(f"Nothing in {expected_file.name} is an output of this model; "
                                  f"recorded: {', '.join(report.not_compared) or 'nothing'}.")
    if not report.passed:
        raise OutputMismatchError(f"Outputs differ from {expected_file.name} (atol {atol:g}, rtol {rtol:g}):\n{report.summary()}")
    return report
