"""Pretraining losses of ONE-PEACE: cross-modal contrast and denoising contrast (DCL), and the two criteria.

Numerics follow the original criteria (image_text_pretrain_loss / audio_text_pretrain_loss). Contrastive negatives
are gathered across processes with gradient (the original gathers them without); `detach_negatives=True` gives the
original's gradients. One deliberate deviation: a DCL term with no masked row (e.g. one-token texts whose vl mask keeps every
token) is the mean over an empty set, NaN in the original, which also makes the total NaN. Here such a term is
skipped: its value is None, its name is listed under `skipped`, and the total is the weighted sum of the other terms.
"""

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F


def label_smoothed_nll_loss(lprobs: torch.Tensor, target: torch.LongTensor, epsilon: float = 0.0) -> torch.Tensor:
    """Mean over rows of `(1 - eps - eps/(N-1)) * nll + eps/(N-1) * sum_j(-logp_j)`, N = number of columns."""
    nll = -lprobs.gather(-1, target[:, None]).squeeze(-1)
    if epsilon == 0:
        return nll.mean()
    eps_i = epsilon / (lprobs.shape[-1] - 1)
    return ((1.0 - epsilon - eps_i) * nll + eps_i * (-lprobs.sum(-1))).mean()


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """All processes' rows concatenated in rank order, differentiable (the gradient of a remote row flows back to
    the process that computed it). Identity outside `torch.distributed`. Every process must pass the same shape."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    # The same op under its newer name (torch 2.13 warns on the old one, which older releases have alone).
    all_gather = getattr(funcol, "all_gather_single_autograd", None) or funcol.all_gather_tensor_autograd
    return all_gather(tensor.contiguous(), gather_dim=0, group=dist.group.WORLD)


def contrastive_loss(
    embeds_a: torch.Tensor,
    embeds_b: torch.Tensor,
    logit_scale: torch.Tensor,
    label_smoothing: float = 0.0,
    detach_negatives: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cross-modal contrast of paired, L2-normalized embeddings (pair i = row i of each), across all processes.

    Each local row is classified among the other side's rows of ALL processes (gathered with gradient, so 2
    processes x batch b train exactly as 1 process x batch 2b). logit_scale: the already exponentiated (and clamped)
    scale, e.g. `OnePeaceModel.clamped_logit_scale()`.
    detach_negatives: the original compares each side with the other side's *detached* (gathered without gradient)
    embeddings; True reproduces its gradients exactly. The loss value is the same either way.
    Returns (mean of the a->b and b->a cross-entropies, number of local rows of a whose best b is its pair, and the
    converse), the counts as float tensors.
    """
    if embeds_a.shape != embeds_b.shape:
        raise ValueError(f"paired embeddings must have the same shape, got {embeds_a.shape} and {embeds_b.shape}.")
    all_a, all_b = gather_with_grad(embeds_a), gather_with_grad(embeds_b)
    if detach_negatives:
        all_a, all_b = all_a.detach(), all_b.detach()
    rank = dist.get_rank() if all_a.shape[0] != embeds_a.shape[0] else 0
    targets = torch.arange(embeds_a.shape[0], device=embeds_a.device) + rank * embeds_a.shape[0]
    sim_ab = logit_scale * embeds_a @ all_b.t()
    sim_ba = logit_scale * embeds_b @ all_a.t()
    loss_ab = label_smoothed_nll_loss(F.log_softmax(sim_ab, dim=-1), targets, label_smoothing)
    loss_ba = label_smoothed_nll_loss(F.log_softmax(sim_ba, dim=-1), targets, label_smoothing)
    with torch.no_grad():
        correct_ab = (sim_ab.argmax(-1) == targets).float().sum()
        correct_ba = (sim_ba.argmax(-1) == targets).float().sum()
    return (loss_ab + loss_ba) / 2, correct_ab, correct_ba


def denoising_contrastive_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    mask_indices: torch.BoolTensor,
    padding_mask: torch.BoolTensor | None = None,
    logit_scale: float = 2.5,
    label_smoothing: float = 0.1,
) -> torch.Tensor | None:
    """Denoising contrast between decoder outputs and the unmasked encoder's features.

    student: (batch, L, C) decoder output (after the mask head), CLS slot first.
    teacher: (batch, L, C) encoder features of the unmasked pass (detached here).
    mask_indices: (batch, L) True = masked position (CLS column included, ignored).
    padding_mask: optional (batch, L - 1) True = padded token / frame (CLS column excluded); dropped on both sides.
    Each masked row is classified among all remaining teacher rows of the batch (target: its own position).
    Returns None when no row is masked (the original returns NaN there).
    """
    dim = student.shape[-1]
    student = student[:, 1:].reshape(-1, dim)
    teacher = teacher.detach()[:, 1:].reshape(-1, dim)
    masked = mask_indices[:, 1:].reshape(-1)
    if padding_mask is not None:
        keep = ~padding_mask.reshape(-1)
        student, teacher, masked = student[keep], teacher[keep], masked[keep]
    rows = masked.nonzero().flatten()
    if rows.numel() == 0:
        return None
    dtype = student.dtype
    student = F.normalize(student[rows].float(), dim=1).to(dtype)
    teacher = F.normalize(teacher.float(), dim=1).to(dtype)
    logits = logit_scale * student @ teacher.t()
    return label_smoothed_nll_loss(F.log_softmax(logits, dim=-1), rows, label_smoothing)


def _total(terms: dict[str, tuple[float, torch.Tensor | None]], result: dict) -> dict:
    total, skipped = 0.0, []
    for name, (weight, value) in terms.items():
        result[name] = value
        if value is None:
            skipped.append(name)
        else:
            total = total + weight * value
    result["loss"] = total
    result["skipped"] = skipped
    return result


class ImageTextPretrainingLoss:
    """Image-text pretraining criterion: itc + weighted DCL of the text, image and vl passes.

    Call with an [`OnePeaceForPretraining`] and the batch; returns a dict with `loss`, `itc_loss`, `dcl_text_loss`,
    `dcl_image_loss`, `dcl_vl_text_loss`, `dcl_vl_image_loss`, `i2t_ncorrect`, `t2i_ncorrect`, `logit_scale_exp`
    and `skipped` (names of DCL terms without masked rows; their value is None and they are left out of `loss`).
    """

    def __init__(self, dcl_text_alpha=0.5, dcl_image_alpha=1.0, dcl_vl_text_alpha=0.5, dcl_vl_image_alpha=0.5,
                 dcl_logit_scale=2.5, label_smoothing=0.1, detach_negatives=False):
        self.alphas = {"text": dcl_text_alpha, "image": dcl_image_alpha, "vl_text": dcl_vl_text_alpha,
                       "vl_image": dcl_vl_image_alpha}
        self.dcl_logit_scale = dcl_logit_scale
        self.label_smoothing = label_smoothing
        self.detach_negatives = detach_negatives

    def dcl(self, student, teacher, mask_indices, padding_mask=None):
        return denoising_contrastive_loss(
            student, teacher, mask_indices, padding_mask, self.dcl_logit_scale, self.label_smoothing
        )

    def __call__(self, model, input_ids, pixel_values, text_mask_indices, text_preserve_ids, image_mask_indices,
                 image_preserve_ids, vl_text_mask_indices, vl_text_preserve_ids, vl_image_mask_indices,
                 vl_image_preserve_ids, attention_mask=None) -> dict:
        text = model(input_ids=input_ids, attention_mask=attention_mask)
        image = model(pixel_values=pixel_values)
        with torch.no_grad():
            vl = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values)
        student_text = model(input_ids=input_ids, attention_mask=attention_mask, text_preserve_ids=text_preserve_ids)
        student_image = model(pixel_values=pixel_values, image_preserve_ids=image_preserve_ids)
        student_vl = model(
            input_ids=input_ids, attention_mask=attention_mask, text_preserve_ids=vl_text_preserve_ids,
            pixel_values=pixel_values, image_preserve_ids=vl_image_preserve_ids,
        )
        logit_scale = model.clamped_logit_scale()
        text_padding = input_ids.eq(model.config.pad_token_id) if attention_mask is None else attention_mask.eq(0)
        itc, i2t, t2i = contrastive_loss(
            image.image_embeds, text.text_embeds, logit_scale, detach_negatives=self.detach_negatives
        )
        result = {"itc_loss": itc, "i2t_ncorrect": i2t, "t2i_ncorrect": t2i, "logit_scale_exp": logit_scale.detach()}
        terms = {
            "itc_loss": (1.0, itc),
            "dcl_text_loss": (self.alphas["text"], self.dcl(
                student_text.text_decoder_output, text.text_encoder_last_hidden_state, text_mask_indices, text_padding
            )),
            "dcl_image_loss": (self.alphas["image"], self.dcl(
                student_image.image_decoder_output, image.image_encoder_last_hidden_state, image_mask_indices
            )),
            "dcl_vl_text_loss": (self.alphas["vl_text"], self.dcl(
                student_vl.text_decoder_output, vl.text_encoder_last_hidden_state, vl_text_mask_indices, text_padding
            )),
            "dcl_vl_image_loss": (self.alphas["vl_image"], self.dcl(
                student_vl.image_decoder_output, vl.image_encoder_last_hidden_state, vl_image_mask_indices
            )),
        }
        return _total(terms, result)


class AudioTextPretrainingLoss:
    """Audio-text pretraining criterion: atc + weighted DCL of the audio and al passes.

    The audio pass's teacher is the audio part of the UNMASKED al pass, as in the original. Returns `loss`,
    `atc_loss`, `dcl_audio_loss`, `dcl_al_text_loss`, `dcl_al_audio_loss`, `a2t_ncorrect`, `t2a_ncorrect`,
    `logit_scale_exp` and `skipped` (see [`ImageTextPretrainingLoss`]).
    """

    def __init__(self, dcl_audio_alpha=1.0, dcl_al_text_alpha=0.5, dcl_al_audio_alpha=0.5, dcl_logit_scale=2.5,
                 label_smoothing=0.1, detach_negatives=False):
        self.alphas = {"audio": dcl_audio_alpha, "al_text": dcl_al_text_alpha, "al_audio": dcl_al_audio_alpha}
        self.dcl_logit_scale = dcl_logit_scale
        self.label_smoothing = label_smoothing
        self.detach_negatives = detach_negatives

    dcl = ImageTextPretrainingLoss.dcl

    def __call__(self, model, input_ids, input_values, padding_mask, audio_mask_indices, audio_preserve_ids,
                 al_text_mask_indices, al_text_preserve_ids, al_audio_mask_indices, al_audio_preserve_ids,
                 attention_mask=None) -> dict:
        with torch.no_grad():
            text = model(input_ids=input_ids, attention_mask=attention_mask)
        audio = model(input_values=input_values, padding_mask=padding_mask)
        with torch.no_grad():
            al = model(input_ids=input_ids, attention_mask=attention_mask, input_values=input_values,
                       padding_mask=padding_mask)
        student_audio = model(input_values=input_values, padding_mask=padding_mask,
                              audio_preserve_ids=audio_preserve_ids)
        student_al = model(
            input_ids=input_ids, attention_mask=attention_mask, text_preserve_ids=al_text_preserve_ids,
            input_values=input_values, padding_mask=padding_mask, audio_preserve_ids=al_audio_preserve_ids,
        )
        logit_scale = model.clamped_logit_scale()
        text_padding = input_ids.eq(model.config.pad_token_id) if attention_mask is None else attention_mask.eq(0)
        frame_padding = audio.audio_encoder_padding_mask[:, 1:]
        atc, a2t, t2a = contrastive_loss(
            audio.audio_embeds, text.text_embeds, logit_scale, detach_negatives=self.detach_negatives
        )
        result = {"atc_loss": atc, "a2t_ncorrect": a2t, "t2a_ncorrect": t2a, "logit_scale_exp": logit_scale.detach()}
        teacher_audio = al.audio_encoder_last_hidden_state
        terms = {
            "atc_loss": (1.0, atc),
            "dcl_audio_loss": (self.alphas["audio"], self.dcl(
                student_audio.audio_decoder_output, teacher_audio, audio_mask_indices, frame_padding
            )),
            "dcl_al_text_loss": (self.alphas["al_text"], self.dcl(
                student_al.text_decoder_output, al.text_encoder_last_hidden_state, al_text_mask_indices, text_padding
            )),
            "dcl_al_audio_loss": (self.alphas["al_audio"], self.dcl(
                student_al.audio_decoder_output, teacher_audio, al_audio_mask_indices, frame_padding
            )),
        }
        return _total(terms, result)


class RetrievalContrastiveLoss:
    """Fine-tuning criterion for image-text or audio-text retrieval: the cross-modal contrast only (the original's
    image_text_retrieval / audio_text_retrieval criteria; label smoothing 0 there).

    Call with an [`OnePeaceModel`] (or any subclass) and a batch of pairs: `input_ids` (+ `attention_mask`) and
    either `pixel_values` or `input_values` (+ `padding_mask`). Returns `loss`, `{x}2t_ncorrect`, `t2{x}_ncorrect`
    and `logit_scale_exp`, x = "i" or "a".
    """

    def __init__(self, label_smoothing=0.0, detach_negatives=False):
        self.label_smoothing = label_smoothing
        self.detach_negatives = detach_negatives

    def __call__(self, model, input_ids, attention_mask=None, pixel_values=None, input_values=None,
                 padding_mask=None) -> dict:
        if (pixel_values is None) == (input_values is None):
            raise ValueError("Pass exactly one of pixel_values (image-text) or input_values (audio-text).")
        # Separate passes, so that pretraining models (whose joint call is the fused vl / al pass) work too.
        text_embeds = model(input_ids=input_ids, attention_mask=attention_mask).text_embeds
        if pixel_values is not None:
            other, short = model(pixel_values=pixel_values).image_embeds, "i"
        else:
            other, short = model(input_values=input_values, padding_mask=padding_mask).audio_embeds, "a"
        logit_scale = model.clamped_logit_scale()
        loss, other_to_text, text_to_other = contrastive_loss(
            other, text_embeds, logit_scale, self.label_smoothing, self.detach_negatives
        )
        return {"loss": loss, f"{short}2t_ncorrect": other_to_text, f"t2{short}_ncorrect": text_to_other,
                "logit_scale_exp": logit_scale.detach(), "skipped": []}


__all__ = [
    "AudioTextPretrainingLoss",
    "ImageTextPretrainingLoss",
    "RetrievalContrastiveLoss",
    "contrastive_loss",
    "denoising_contrastive_loss",
    "gather_with_grad",
    "label_smoothed_nll_loss",
]
