"""Embedding losses by ms-swift's `--loss_type` names (swift/loss/embedding.py), over pooled sentence vectors.

    infonce             anchors against their positive, their hard negatives and (in-batch) every other row's
                        documents: cross-entropy of similarity / temperature, the positive as the target; options
                        as ms-swift's: fake-negative masking, anchor-anchor and document-document negatives
    cosine_similarity   MSE between cos(anchor, positive) and a float label
    contrastive         0.5 * (label * d^2 + (1 - label) * relu(margin - d)^2), d = 1 - cos; labels 0 / 1
    online_contrastive  the contrastive terms of the hard pairs only (positives farther than the nearest negative,
                        negatives nearer than the farthest positive), summed; labels 0 / 1

The similarity is a plain dot product, as ms-swift's: the vectors come L2-normalised from the pooling (ms-swift's
embedding models normalise at the end of their forward), which makes it the cosine.
Shapes: B rows, G documents per row (the positive first, then the hard negatives), D embed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

LOSS_TYPES = ("infonce", "cosine_similarity", "contrastive", "online_contrastive")
PAIR_LOSS_TYPES = ("cosine_similarity", "contrastive", "online_contrastive")
CONTRASTIVE_MARGIN = 0.5  # ms-swift's (and sentence-transformers') fixed margin
_MASKED = -1e30  # a padded negative's logit: exp underflows to exactly 0, no NaN when a whole row is masked


def infonce_logits(anchors_BD, docs_BGD, doc_mask_BG, temperature: float, use_batch: bool, *,
                   fake_negative_margin: float | None = None, include_qq: bool = False, include_dd: bool = False):
    """(logits, target index per row). Without use_batch: [B, G] over the row's own documents. With it: [B, B*G]
    over every document of the batch, then (ms-swift's Qwen3-Embedding options) the other anchors [B, B]
    (include_qq) and every document against the row's positive [B, B*G] (include_dd). Padded negatives (doc_mask
    False), an anchor against itself and a positive against itself get a logit of -1e30, which the softmax gives
    zero weight; with fake_negative_margin, so do the anchor-document and anchor-anchor similarities above the row's
    positive similarity (not differentiated) + margin: likely unlabelled positives."""
    B, G, D = docs_BGD.shape
    if not use_batch:
        logits = jnp.einsum("BD,BGD->BG", anchors_BD, docs_BGD) / temperature
        return jnp.where(doc_mask_BG, logits, _MASKED), jnp.zeros((B,), jnp.int32)
    docs_ND = docs_BGD.reshape(B * G, D)
    valid_N = doc_mask_BG.reshape(1, B * G)
    target_B = jnp.arange(B) * G
    qd = jnp.where(valid_N, jnp.einsum("BD,ND->BN", anchors_BD, docs_ND), _MASKED)
    threshold = jax.lax.stop_gradient(qd[jnp.arange(B), target_B])[:, None] + (fake_negative_margin or 0.0)
    mask_fake = (lambda x: jnp.where(x > threshold, _MASKED, x)) if fake_negative_margin is not None else (
        lambda x: x)
    parts = [mask_fake(qd)]
    if include_qq:
        qq = jnp.einsum("BD,CD->BC", anchors_BD, anchors_BD)
        parts.append(mask_fake(jnp.where(jnp.eye(B, dtype=bool), _MASKED, qq)))
    if include_dd:
        dd = jnp.einsum("BD,ND->BN", docs_BGD[:, 0], docs_ND)
        own_positive = jnp.arange(B * G)[None, :] == target_B[:, None]
        parts.append(jnp.where(valid_N & ~own_positive, dd, _MASKED))
    return jnp.concatenate(parts, axis=1) / temperature, target_B


def infonce_loss(anchors_BD, docs_BGD, doc_mask_BG, *, temperature: float = 0.1, use_batch: bool = True,
                 fake_negative_margin: float | None = None, include_qq: bool = False, include_dd: bool = False):
    """(mean cross-entropy over rows, metrics): `acc` is the fraction of rows whose positive scores highest among
    the candidates the loss compares it with; `mean_pos` / `mean_neg` / `margin` are ms-swift's InfoNCE eval metrics
    (mean positive similarity, mean hard-negative similarity, mean of positive minus the row's hardest negative;
    NaN-free: 0 when there are no hard negatives)."""
    anchors_BD, docs_BGD = anchors_BD.astype(jnp.float32), docs_BGD.astype(jnp.float32)
    doc_mask_BG = jnp.asarray(doc_mask_BG, bool)
    logits, target_B = infonce_logits(anchors_BD, docs_BGD, doc_mask_BG, temperature, use_batch,
                                      fake_negative_margin=fake_negative_margin, include_qq=include_qq,
                                      include_dd=include_dd)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    loss = -jnp.mean(jnp.take_along_axis(log_probs, target_B[:, None], axis=1))
    sims_BG = jnp.einsum("BD,BGD->BG", anchors_BD, docs_BGD)
    neg_mask = doc_mask_BG.at[:, 0].set(False)
    n_neg = jnp.maximum(neg_mask.sum(), 1)
    hardest = jnp.max(jnp.where(neg_mask, sims_BG, -jnp.inf), axis=1)
    has_neg = neg_mask.any(axis=1)
    metrics = {"acc": jnp.mean(jnp.argmax(logits, axis=1) == target_B),
               "mean_pos": jnp.mean(sims_BG[:, 0]),
               "mean_neg": jnp.sum(jnp.where(neg_mask, sims_BG, 0.0)) / n_neg,
               "margin": jnp.sum(jnp.where(has_neg, sims_BG[:, 0] - hardest, 0.0)) / jnp.maximum(has_neg.sum(), 1)}
    return loss, metrics


def cosine(a_BD, b_BD, eps: float = 1e-8):
    """cos(a, b) per row, as torch.cosine_similarity: a.b / max(|a| |b|, eps)."""
    a, b = a_BD.astype(jnp.float32), b_BD.astype(jnp.float32)
    norms = jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1)
    return jnp.sum(a * b, axis=-1) / jnp.maximum(norms, eps)


def cosine_similarity_loss(first_BD, second_BD, labels_B):
    """mean((cos - label)^2): the MSE of the pair's cosine against its float label."""
    return jnp.mean(jnp.square(cosine(first_BD, second_BD) - labels_B.astype(jnp.float32)))


def contrastive_loss(first_BD, second_BD, labels_B, margin: float = CONTRASTIVE_MARGIN):
    """mean(0.5 * (label d^2 + (1 - label) relu(margin - d)^2)) with the cosine distance d = 1 - cos."""
    d = 1.0 - cosine(first_BD, second_BD)
    labels = labels_B.astype(jnp.float32)
    return jnp.mean(0.5 * (labels * d ** 2 + (1.0 - labels) * jax.nn.relu(margin - d) ** 2))


def online_contrastive_loss(first_BD, second_BD, labels_B, margin: float = CONTRASTIVE_MARGIN):
    """Contrastive terms of the hard pairs only, summed (not averaged), as sentence-transformers' and ms-swift's
    OnlineContrastiveLoss: negatives nearer than the farthest positive (or than the negatives' mean, with fewer
    than two positives), positives farther than the nearest negative (or than the positives' mean, with fewer than
    two negatives). Boolean selection written as masks, so the shapes stay static."""
    d = 1.0 - cosine(first_BD, second_BD)
    pos, neg = labels_B == 1, labels_B == 0
    n_pos, n_neg = pos.sum(), neg.sum()
    mean = lambda m: jnp.sum(jnp.where(m, d, 0.0)) / jnp.maximum(m.sum(), 1)  # noqa: E731
    neg_bound = jnp.where(n_pos > 1, jnp.max(jnp.where(pos, d, -jnp.inf)), mean(neg))
    pos_bound = jnp.where(n_neg > 1, jnp.min(jnp.where(neg, d, jnp.inf)), mean(pos))
    hard_neg = neg & (d < neg_bound)
    hard_pos = pos & (d > pos_bound)
    return (jnp.sum(jnp.where(hard_pos, d ** 2, 0.0))
            + jnp.sum(jnp.where(hard_neg, jax.nn.relu(margin - d) ** 2, 0.0)))


PAIR_LOSSES = {"cosine_similarity": cosine_similarity_loss, "contrastive": contrastive_loss,
               "online_contrastive": online_contrastive_loss}
