"""Predicting with several networks or decoders at once."""
from __future__ import annotations

import torch


def average_probability_logits(logits_list: list[torch.Tensor]) -> torch.Tensor:
    """Logits whose softmax is the mean of the given logits' softmax (log of the mean probabilities), so the
    evaluator's softmax/argmax sees the averaged prediction."""
    mean = torch.stack([torch.softmax(logits, dim=1) for logits in logits_list]).mean(dim=0)
    return torch.log(mean.clamp_min(torch.finfo(mean.dtype).tiny))
