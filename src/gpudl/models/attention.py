"""A small Vision-Transformer-style classifier (Vaswani et al. 2017; Dosovitskiy et al. 2021).

The image is cut into tokens (its rows, or p x p patches), each token is embedded linearly and
given a learned position embedding (self-attention itself is blind to order), a learned [CLS]
token is prepended, and pre-norm encoder blocks let every token attend to every other. The
class is read from the [CLS] token's final state (or from the mean of all tokens).

Pre-norm (LayerNorm inside the residual branch, Xiong et al. 2020) keeps the residual stream an
identity path, so a small model trains stably without learning-rate warm-up.
"""

from __future__ import annotations

import torch

from gpudl import nn, ops
from gpudl.checks import check_choice, check_float, check_int
from gpudl.models._base import ClassificationModule


class Block(torch.nn.Module):
    """One pre-norm transformer encoder block. x [N, T, embed_dim] -> [N, T, embed_dim]."""

    def __init__(self, embed_dim: int, num_heads: int, mlp_dim: int, dropout: float):
        super().__init__()
        self.ln_1 = nn.LayerNorm(embed_dim)
        self.attn = nn.MultiheadAttention(embed_dim, num_heads, dropout=dropout, batch_first=True)
        self.ln_2 = nn.LayerNorm(embed_dim)
        self.fc = nn.Linear(embed_dim, mlp_dim, activation="gelu")  # GELU fused into the GEMM epilogue
        self.proj = nn.Linear(mlp_dim, embed_dim)
        self.dropout = torch.nn.Dropout(dropout)

    def forward(self, x):
        h = self.ln_1(x)
        x = x + self.dropout(self.attn(h, h, h)[0])
        return x + self.dropout(self.proj(self.fc(self.ln_2(x))))


class AttentionModule(ClassificationModule):
    """images [N, in_channels, image_size, image_size] -> logits [N, num_classes].

    patch_size None: each image row is a token (image_size tokens of in_channels*image_size
    features); an int p: non-overlapping p x p patches ((image_size/p)**2 tokens of
    in_channels*p*p features). pool 'cls' or 'mean'. Loss gpudl.ops.cross_entropy.
    optimizer None means Adam at lr 1e-3.
    """

    default_lr = 1e-3

    def __init__(self, image_size: int = 8, patch_size: int | None = None, embed_dim: int = 64, num_heads: int = 4,
                 num_layers: int = 2, mlp_dim: int = 128, num_classes: int = 10, dropout: float = 0.0,
                 optimizer=None, scheduler=None, in_channels: int = 1, pool: str = "cls"):
        owner = type(self).__name__
        image_size = check_int(owner, "image_size", image_size)
        patch_size = check_int(owner, "patch_size", patch_size, allow_none=True, none_means="one token per row")
        if patch_size is not None:
            if image_size % patch_size:
                raise ValueError(f"{owner}: patch_size {patch_size} must divide image_size {image_size}")
        embed_dim = check_int(owner, "embed_dim", embed_dim)
        num_heads = check_int(owner, "num_heads", num_heads)
        if embed_dim % num_heads:
            raise ValueError(f"{owner}: num_heads {num_heads} must divide embed_dim {embed_dim}")
        num_layers = check_int(owner, "num_layers", num_layers)
        mlp_dim = check_int(owner, "mlp_dim", mlp_dim)
        dropout = check_float(owner, "dropout", dropout, 0.0, 1.0, high_open=True)
        in_channels = check_int(owner, "in_channels", in_channels)
        pool = check_choice(owner, "pool", pool, ("cls", "mean"))
        super().__init__(num_classes, optimizer, scheduler)  # checks num_classes and the factories
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])

        if patch_size is None:
            num_tokens, token_dim = image_size, in_channels * image_size
        else:
            num_tokens, token_dim = (image_size // patch_size) ** 2, in_channels * patch_size**2
        self.embed = nn.Linear(token_dim, embed_dim)
        self.cls_token = torch.nn.Parameter(torch.zeros(1, 1, embed_dim)) if pool == "cls" else None
        self.pos_embed = torch.nn.Parameter(torch.randn(1, num_tokens + (pool == "cls"), embed_dim) * 0.02)
        self.drop = torch.nn.Dropout(dropout)
        self.blocks = torch.nn.ModuleList(Block(embed_dim, num_heads, mlp_dim, dropout) for _ in range(num_layers))
        self.ln_f = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)

    def tokens(self, x):
        """images [N, C, S, S] -> tokens [N, T, token_dim]."""
        hp = self.hparams
        if x.dim() != 4 or x.shape[1:] != (hp.in_channels, hp.image_size, hp.image_size):
            raise ValueError(f"AttentionModule expects images [N, {hp.in_channels}, {hp.image_size}, {hp.image_size}], "
                             f"got {tuple(x.shape)}")
        n, c, s, _ = x.shape
        if hp.patch_size is None:
            return x.permute(0, 2, 1, 3).reshape(n, s, c * s)
        p, g = hp.patch_size, s // hp.patch_size
        # [N, C, g, p, g, p] -> [N, g, g, C, p, p]: one row per patch, patches in raster order
        return x.reshape(n, c, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(n, g * g, c * p * p)

    def forward(self, x):
        h = self.embed(self.tokens(x))
        if self.cls_token is not None:
            h = torch.cat([self.cls_token.expand(h.shape[0], -1, -1), h], dim=1)
        h = self.drop(h + self.pos_embed)
        for block in self.blocks:
            h = block(h)
        h = self.ln_f(h)
        return self.head(h[:, 0] if self.cls_token is not None else h.mean(1))

    def loss(self, logits, y):
        return ops.cross_entropy(logits, y)

    def predict_labels(self, logits):
        return logits.argmax(-1)
