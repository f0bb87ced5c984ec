"""The vision tower of GLM-4.1V / GLM-4.5V / GLM-4.6V (transformers' Glm4vVisionModel): pixels -> image features
that the text model reads through its embeddings input at the image tokens.

Patches (pre-flattened by images.py, each 3 x temporal x patch x patch values) -> Conv3d patch embedding ->
RMSNorm -> + the learned position table resampled bicubically to each image's patch grid -> blocks
(pre-RMSNorm; attention within each image only, with 2-D rotary over patch rows and columns; SwiGLU) ->
RMSNorm -> each 2 x 2 window of patches merged by a strided Conv2d -> the merger (Linear, LayerNorm, GELU,
SwiGLU) -> (patches / 4, text width). Patches arrive window by window (images.py orders them so).
No I/O and no preprocessing here.

Glossary: N patches, P values per patch, W tower width, H heads, D head dim, M merge size, C text width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from glmkit.config import VisionConfig
from glmkit.layers import Norm, rope_half_split


class PatchEmbed(nn.Module):
    def __init__(self, v: VisionConfig):
        super().__init__()
        self.v = v
        kernel = (v.temporal_patch_size, v.patch_size, v.patch_size)
        self.proj = nn.Conv3d(v.in_channels, v.hidden_size, kernel_size=kernel, stride=kernel)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (N, P) -> (N, W): one kernel application per patch."""
        v = self.v
        x = pixels.view(-1, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
        return self.proj(x.to(self.proj.weight.dtype)).view(-1, v.hidden_size)  # (N, W)


class PositionTable(nn.Module):
    """The learned (image_size / patch)^2 table, resampled to each image's grid (bicubic, border padding,
    sampling at patch centres: transformers' grid_sample call)."""

    def __init__(self, v: VisionConfig):
        super().__init__()
        self.position_embedding = nn.Embedding((v.image_size // v.patch_size) ** 2, v.hidden_size)

    def forward(self, x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, heights: torch.Tensor,
                widths: torch.Tensor) -> torch.Tensor:
        """x (N, W); each patch's row, column and its image's grid height and width (N,) -> x + positions."""
        table = self.position_embedding.weight  # (S*S, W)
        side = int(table.shape[0] ** 0.5)
        grid2d = table.view(side, side, -1).permute(2, 0, 1)[None].float()  # (1, W, S, S)
        at = torch.stack(((cols + 0.5) / widths * 2 - 1, (rows + 0.5) / heights * 2 - 1), dim=-1)  # (N, 2): x, y
        sampled = F.grid_sample(grid2d, at[None, :, None].float(), mode="bicubic", align_corners=False,
                                padding_mode="border")  # (1, W, N, 1)
        return x + sampled[0, :, :, 0].T.to(table.dtype)  # (N, W)


class VisionAttention(nn.Module):
    def __init__(self, v: VisionConfig):
        super().__init__()
        self.heads = v.num_heads
        self.qkv = nn.Linear(v.hidden_size, 3 * v.hidden_size, bias=v.attention_bias)
        self.proj = nn.Linear(v.hidden_size, v.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        """x (N, W), cos / sin (N, D/2), lengths: patches per image (attention stays within each)."""
        N, W = x.shape
        q, k, v = self.qkv(x).view(N, 3, self.heads, -1).permute(1, 2, 0, 3)  # (H, N, D) each
        q, k = rope_half_split(q[None], cos[None, None], sin[None, None])[0], \
            rope_half_split(k[None], cos[None, None], sin[None, None])[0]
        out = [F.scaled_dot_product_attention(qi, ki, vi) for qi, ki, vi in  # per image: (H, n, D)
               zip(q.split(lengths, 1), k.split(lengths, 1), v.split(lengths, 1))]
        return self.proj(torch.cat(out, dim=1).transpose(0, 1).reshape(N, W))  # (N, W)


class SwiGLU(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(width, hidden, bias=False)
        self.up_proj = nn.Linear(width, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class VisionBlock(nn.Module):
    def __init__(self, v: VisionConfig):
        super().__init__()
        self.norm1, self.norm2 = Norm(v.hidden_size, v.norm_eps), Norm(v.hidden_size, v.norm_eps)
        self.attn = VisionAttention(v)
        self.mlp = SwiGLU(v.hidden_size, v.out_hidden_size)  # the tower's MLP is out_hidden_size wide

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, lengths)
        return x + self.mlp(self.norm2(x))


class Merger(nn.Module):
    def __init__(self, v: VisionConfig):
        super().__init__()
        C = v.out_hidden_size
        self.proj = nn.Linear(C, C, bias=False)
        self.post_projection_norm = nn.LayerNorm(C)
        self.gate_proj = nn.Linear(C, v.intermediate_size, bias=False)
        self.up_proj = nn.Linear(C, v.intermediate_size, bias=False)
        self.down_proj = nn.Linear(v.intermediate_size, C, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.post_projection_norm(self.proj(x)))  # (n, C)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # (n, C)


class VisionTower(nn.Module):
    def __init__(self, v: VisionConfig):
        super().__init__()
        self.v = v
        self.patch_embed = PatchEmbed(v)
        self.post_conv_layernorm = Norm(v.hidden_size, v.norm_eps)
        self.embeddings = PositionTable(v)
        self.blocks = nn.ModuleList(VisionBlock(v) for _ in range(v.depth))
        self.post_layernorm = Norm(v.hidden_size, v.norm_eps)
        M = v.spatial_merge_size
        self.downsample = nn.Conv2d(v.hidden_size, v.out_hidden_size, kernel_size=M, stride=M)
        self.merger = Merger(v)

    def patch_coordinates(self, grids: list[tuple[int, int, int]]) -> tuple[torch.Tensor, ...]:
        """Each patch's (row, column) and its image's grid (height, width), patches ordered window by window."""
        M, device = self.v.spatial_merge_size, self.post_layernorm.weight.device
        out = []
        for t, h, w in grids:
            rows, cols = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
            shape = (h // M, M, w // M, M)  # windows of M x M patches, row by row
            rows, cols = (p.reshape(shape).transpose(1, 2).flatten().repeat(t) for p in (rows, cols))  # (t h w,)
            size = torch.tensor([h, w], device=device).expand(rows.shape[0], 2)
            out.append(torch.cat([rows[:, None], cols[:, None], size], dim=1))
        return tuple(torch.cat(out).T)  # 4 x (N,)

    def rotary(self, rows: torch.Tensor, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """2-D rotary: a head's first half of frequencies follows the row, the second the column -> (N, D/2)."""
        half = self.v.hidden_size // self.v.num_heads // 2  # D/2: a quarter of a head's dims per axis
        inv_freq = 1.0 / (self.v.rope_theta ** (torch.arange(0, half, 2, device=rows.device).float() / half))
        angles = torch.cat([rows[:, None].float() * inv_freq, cols[:, None].float() * inv_freq], dim=-1)  # (N, D/2)
        return angles.cos(), angles.sin()

    def forward(self, pixels: torch.Tensor, grids: list[tuple[int, int, int]]) -> torch.Tensor:
        """pixels (N, P) of the images with patch grids `grids` -> features (N / M^2, C), image after image."""
        rows, cols, heights, widths = self.patch_coordinates(grids)
        x = self.post_conv_layernorm(self.patch_embed(pixels))  # (N, W)
        cos, sin = self.rotary(rows, cols)  # (N, D/2) each
        x = self.embeddings(x, rows, cols, heights.float(), widths.float())  # (N, W)
        lengths = [h * w for t, h, w in grids for _ in range(t)]  # attention spans one frame of one image
        for block in self.blocks:
            x = block(x, cos, sin, lengths)
        x = self.post_layernorm(x)  # (N, W)
        M = self.v.spatial_merge_size
        x = self.downsample(x.view(-1, M, M, x.shape[-1]).permute(0, 3, 1, 2)).view(-1, self.v.out_hidden_size)
        return self.merger(x)  # (N / M^2, C)
