"""PyTorch reference of VAR's VQ-VAE encoder and decoder, for parity tests (var_spec.md §1.2–1.4).

Re-implemented from the spec, with VAR's module tree so that state-dict keys match VAR's
checkpoint (`conv_in.weight`, `down.0.block.1.norm1.weight`, `down.4.attn.0.qkv.weight`,
`mid.block_1.conv1.weight`, `up.3.upsample.conv.weight`, ...). Tensors are NCHW.
Only the parity tests import this file, so torch is imported at the top.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def normalize(channels: int) -> nn.GroupNorm:
  return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
  def __init__(self, in_channels: int, out_channels: int):
    super().__init__()
    self.norm1 = normalize(in_channels)
    self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=1, padding=1)
    self.norm2 = normalize(out_channels)
    self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1)
    self.nin_shortcut = (
      nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()
    )

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    h = self.conv1(F.silu(self.norm1(x)))
    h = self.conv2(F.silu(self.norm2(h)))
    return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
  def __init__(self, channels: int):
    super().__init__()
    self.channels = channels
    self.norm = normalize(channels)
    self.qkv = nn.Conv2d(channels, 3 * channels, 1)
    self.proj_out = nn.Conv2d(channels, channels, 1)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.shape
    qkv = self.qkv(self.norm(x)).reshape(b, 3, c, h * w)
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
    # (B, Q, K): every query row-major position against every key position.
    weights = torch.softmax(torch.einsum("bcq,bck->bqk", q, k) * c**-0.5, dim=-1)
    out = torch.einsum("bqk,bck->bcq", weights, v).reshape(b, c, h, w)
    return x + self.proj_out(out)


class Downsample2x(nn.Module):
  def __init__(self, channels: int):
    super().__init__()
    self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample2x(nn.Module):
  def __init__(self, channels: int):
    super().__init__()
    self.conv = nn.Conv2d(channels, channels, 3, stride=1, padding=1)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


def _mid(channels: int, using_mid_sa: bool) -> nn.Module:
  mid = nn.Module()
  mid.block_1 = ResnetBlock(channels, channels)
  mid.attn_1 = AttnBlock(channels) if using_mid_sa else nn.Identity()
  mid.block_2 = ResnetBlock(channels, channels)
  return mid


class Encoder(nn.Module):
  def __init__(
    self,
    ch: int = 160,
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4),
    num_res_blocks: int = 2,
    in_channels: int = 3,
    z_channels: int = 32,
    using_sa: bool = True,
    using_mid_sa: bool = True,
  ):
    super().__init__()
    self.num_resolutions = len(ch_mult)
    self.num_res_blocks = num_res_blocks
    in_ch_mult = (1, *ch_mult)
    self.conv_in = nn.Conv2d(in_channels, ch, 3, stride=1, padding=1)
    self.down = nn.ModuleList()
    block_in = ch
    for i_level in range(self.num_resolutions):
      block_in = ch * in_ch_mult[i_level]
      block_out = ch * ch_mult[i_level]
      level = nn.Module()
      level.block = nn.ModuleList()
      level.attn = nn.ModuleList()
      for _ in range(num_res_blocks):
        level.block.append(ResnetBlock(block_in, block_out))
        block_in = block_out
        if i_level == self.num_resolutions - 1 and using_sa:
          level.attn.append(AttnBlock(block_in))
      if i_level != self.num_resolutions - 1:
        level.downsample = Downsample2x(block_in)
      self.down.append(level)
    self.mid = _mid(block_in, using_mid_sa)
    self.norm_out = normalize(block_in)
    self.conv_out = nn.Conv2d(block_in, z_channels, 3, stride=1, padding=1)

  def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Returns the latent and the intermediates named as in the Flax encoder's `feats`."""
    feats = {}
    h = self.conv_in(x)
    for i_level, level in enumerate(self.down):
      for i_block in range(self.num_res_blocks):
        h = level.block[i_block](h)
        if len(level.attn) > 0:
          h = level.attn[i_block](h)
      feats[f"down_{i_level}"] = h
      if i_level != self.num_resolutions - 1:
        h = level.downsample(h)
    feats["pre_mid"] = h
    h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
    feats["mid"] = h
    return self.conv_out(F.silu(self.norm_out(h))), feats

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.forward_with_features(x)[0]


class Decoder(nn.Module):
  def __init__(
    self,
    ch: int = 160,
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4),
    num_res_blocks: int = 2,
    in_channels: int = 3,
    z_channels: int = 32,
    using_sa: bool = True,
    using_mid_sa: bool = True,
  ):
    super().__init__()
    self.num_resolutions = len(ch_mult)
    self.num_res_blocks = num_res_blocks
    block_in = ch * ch_mult[-1]
    self.conv_in = nn.Conv2d(z_channels, block_in, 3, stride=1, padding=1)
    self.mid = _mid(block_in, using_mid_sa)
    levels: list[nn.Module] = []
    for i_level in reversed(range(self.num_resolutions)):
      block_out = ch * ch_mult[i_level]
      level = nn.Module()
      level.block = nn.ModuleList()
      level.attn = nn.ModuleList()
      for _ in range(num_res_blocks + 1):
        level.block.append(ResnetBlock(block_in, block_out))
        block_in = block_out
        if i_level == self.num_resolutions - 1 and using_sa:
          level.attn.append(AttnBlock(block_in))
      if i_level != 0:
        level.upsample = Upsample2x(block_in)
      levels.insert(0, level)
    # Indexed by level (up[0] is the full-resolution level), executed from the last level down.
    self.up = nn.ModuleList(levels)
    self.norm_out = normalize(block_in)
    self.conv_out = nn.Conv2d(block_in, in_channels, 3, stride=1, padding=1)

  def forward(self, z: torch.Tensor) -> torch.Tensor:
    h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
    for i_level in reversed(range(self.num_resolutions)):
      level = self.up[i_level]
      for i_block in range(self.num_res_blocks + 1):
        h = level.block[i_block](h)
        if len(level.attn) > 0:
          h = level.attn[i_block](h)
      if i_level != 0:
        h = level.upsample(h)
    return self.conv_out(F.silu(self.norm_out(h)))
