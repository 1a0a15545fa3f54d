"""``text_query``: the text's projected steps query every other modality's steps.

After USTC-IAT's ABAW10 system: for each other modality m, multi-head cross-attention with the
text branch's projected steps as queries and m's projected steps as keys and values, a residual
connection and a LayerNorm, then the mean over the steps. A clip that lacks m attends to m's
learned token instead of its steps; a clip without text queries with text's learned token. The
output is the text embedding followed by one attended vector per other modality.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from emimimic.errors import ConfigError
from emimimic.models.fusion.base import Fusion, FusionInput, FusionOutput


class TextQueryFusion(Fusion):
    """Text-query cross-attention over the other modalities' steps (see the module docstring).

    Args (beyond :class:`~emimimic.models.fusion.Fusion`'s):
        heads: attention heads (must divide H).
    """

    needs_steps = True

    def __init__(self, modalities: Sequence[str], hidden: int, num_targets: int,
                 dropout: float, heads: int = 4) -> None:
        super().__init__(modalities, hidden, num_targets, dropout)
        self.others = [m for m in self.modalities if m != "text"]
        if "text" not in self.modalities or not self.others:
            raise ConfigError(f"fusion 'text_query' needs text and at least one other modality, "
                              f"the network has {self.modalities}")
        if heads < 1 or hidden % heads:
            raise ConfigError(f"fusion 'text_query': heads={heads} must divide hidden={hidden}")
        self.attention = nn.ModuleDict({
            m: nn.MultiheadAttention(hidden, heads, dropout=dropout, batch_first=True)
            for m in self.others})
        self.norm = nn.ModuleDict({m: nn.LayerNorm(hidden) for m in self.others})
        #: one learned token per modality: what a clip lacking the modality attends to (or, for
        #: text, queries with)
        self.tokens = nn.ParameterDict({m: nn.Parameter(torch.randn(hidden) * 0.02)
                                        for m in self.modalities})
        self.out_dim = hidden * len(self.modalities)

    def attend(self, m: str, queries: Tensor, steps: Tensor, present: Tensor) -> Tensor:
        """Returns the pooled attention of ``queries`` ``[B, S, H]`` over modality ``m``.

        Keys are ``m``'s learned token followed by its steps ``[B, T, H]``; a clip that has ``m``
        masks the token, a clip that lacks it masks the steps, so each attends to exactly one.
        """
        batch = steps.shape[0]
        token = self.tokens[m].to(steps.dtype).expand(batch, 1, -1)
        keys = torch.cat([token, steps], dim=1)
        present = present.to(device=steps.device, dtype=torch.bool)
        ignore = torch.cat([present[:, None], (~present)[:, None].expand(-1, steps.shape[1])],
                           dim=1)
        attended, _ = self.attention[m](queries, keys, keys, key_padding_mask=ignore,
                                        need_weights=False)
        return self.norm[m](queries + attended).mean(dim=1)

    def forward(self, inputs: FusionInput) -> FusionOutput:
        """Returns ``[B, H * M]``: the text embedding, then one vector per other modality."""
        if inputs.steps is None:
            raise ValueError("fusion 'text_query' needs the branches' steps (FusionInput.steps)")
        text = inputs.steps["text"]
        has_text = inputs.present["text"].to(device=text.device, dtype=torch.bool)
        queries = torch.where(has_text[:, None, None], text,
                              self.tokens["text"].to(text.dtype).expand_as(text))
        parts = [inputs.embeddings["text"]]
        parts += [self.attend(m, queries, inputs.steps[m], inputs.present[m])
                  for m in self.others]
        return FusionOutput(torch.cat(parts, dim=-1))


FUSION = TextQueryFusion
