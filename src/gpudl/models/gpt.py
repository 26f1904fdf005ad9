"""A small decoder-only transformer language model (GPT: Radford et al. 2018, 2019) over characters.

Tokens [N, T] (character ids) are embedded, given a learned position embedding, and pass through
pre-norm blocks: causal multi-head self-attention (gpudl's flash attention with is_causal=True,
so position t sees positions <= t only) and a GELU MLP (GELU fused into the first GEMM). A final
LayerNorm and an output head that reuses the token embedding matrix (weight tying, Press & Wolf
2017: fewer parameters, and a rare character's input and output vectors learn together) give
the logits of the next character at every position; the loss is gpudl's cross-entropy.

Metrics: {train,val,test}/loss in nats per character, {val,test}/bpc = loss / ln 2 (bits per
character), val/bpc_best (running minimum over validation epochs, what sweepers optimize).
"""

from __future__ import annotations

import math

import torch
from torchmetrics import MeanMetric, MinMetric

from gpudl import nn, ops
from gpudl.checks import check_float, check_int
from gpudl.models._base import SupervisedModule


class Block(torch.nn.Module):
    """Pre-norm decoder block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, d_model: int, num_heads: int, mlp_dim: int, dropout: float):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d_model)
        # One packed q/k/v GEMM; flash attention with is_causal=True (position t sees t' <= t).
        self.attn = nn.MultiheadAttention(d_model, num_heads, dropout=dropout, batch_first=True)
        self.ln_2 = nn.LayerNorm(d_model)
        self.fc = nn.Linear(d_model, mlp_dim, activation="gelu")  # GELU in the GEMM's epilogue
        self.proj = nn.Linear(mlp_dim, d_model)
        self.drop = torch.nn.Dropout(dropout)

    def forward(self, x):
        h = self.ln_1(x)
        x = x + self.drop(self.attn(h, h, h, is_causal=True)[0])
        return x + self.drop(self.proj(self.fc(self.ln_2(x))))


class GPTModule(SupervisedModule):
    """Character ids [N, T] (T <= context_length) -> next-character logits [N, T, vocab_size].

    vocab_size must equal the data's vocabulary (gpudl.data.TextDataModule.vocab_size); the
    vocabulary itself (a string, id i = character i) is taken from the data module when fitting
    and stored in every checkpoint (key "vocab"), so scripts/sample.py needs only the checkpoint.
    optimizer None means Adam at lr 1e-3.
    """

    default_lr = 1e-3

    def __init__(self, vocab_size: int = 103, context_length: int = 128, d_model: int = 96, num_heads: int = 4,
                 num_layers: int = 3, mlp_dim: int | None = None, dropout: float = 0.0, optimizer=None,
                 scheduler=None):
        owner = type(self).__name__
        vocab_size = check_int(owner, "vocab_size", vocab_size, minimum=2)
        context_length = check_int(owner, "context_length", context_length)
        d_model = check_int(owner, "d_model", d_model)
        num_heads = check_int(owner, "num_heads", num_heads)
        if d_model % num_heads:
            raise ValueError(f"{owner}: num_heads {num_heads} must divide d_model {d_model}")
        num_layers = check_int(owner, "num_layers", num_layers)
        mlp_dim = check_int(owner, "mlp_dim", mlp_dim, allow_none=True, none_means="4 * d_model")
        dropout = check_float(owner, "dropout", dropout, 0.0, 1.0, high_open=True)
        super().__init__(optimizer, scheduler)  # checks the factories
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        mlp_dim = 4 * d_model if mlp_dim is None else mlp_dim

        self.tok_emb = torch.nn.Embedding(vocab_size, d_model)
        self.pos_emb = torch.nn.Embedding(context_length, d_model)
        self.drop = torch.nn.Dropout(dropout)
        self.blocks = torch.nn.ModuleList(Block(d_model, num_heads, mlp_dim, dropout) for _ in range(num_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.vocab: str | None = None
        self.val_bpc, self.test_bpc = MeanMetric(), MeanMetric()
        self.val_bpc_best = MinMetric()
        self._init_weights(num_layers)

    def _init_weights(self, num_layers: int) -> None:
        # Small normal weights (std 0.02, as GPT-2); the projections that write into the residual
        # stream are scaled by 1/sqrt(2 * layers) so its variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                torch.nn.init.zeros_(p)
            elif p.dim() == 2:
                std = 0.02 / math.sqrt(2 * num_layers) if name.endswith("proj.weight") else 0.02
                torch.nn.init.normal_(p, 0.0, std)

    # ------------------------------------------------------------------ model
    def forward(self, idx):
        hp = self.hparams
        if idx.dim() != 2 or idx.dtype != torch.int64:
            raise ValueError(f"GPTModule expects int64 token ids [N, T], got {idx.dtype} of shape {tuple(idx.shape)}")
        if not 1 <= idx.shape[1] <= hp.context_length:
            raise ValueError(f"GPTModule: sequence length {idx.shape[1]} must be in "
                             f"1..context_length={hp.context_length}")
        pos = torch.arange(idx.shape[1], device=idx.device)
        h = self.drop(self.tok_emb(idx) + self.pos_emb(pos))
        for block in self.blocks:
            h = block(h)
        # Weight-tied head: the logits are the final states against every token's embedding.
        return ops.linear(self.ln_f(h), self.tok_emb.weight)

    def loss(self, logits, y):
        return ops.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    # ------------------------------------------------------------------ metrics
    def _step(self, batch, stage):
        loss = super()._step(batch, stage)  # logs {stage}/loss
        if stage != "train":
            # Weighted by windows (all of one length): the split's mean loss / ln 2, bits per character.
            bpc = getattr(self, f"{stage}_bpc")
            bpc.update(loss.detach() / math.log(2), weight=batch[0].shape[0])
            self.log(f"{stage}/bpc", bpc, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def on_train_start(self):
        if self.trainer.global_step == 0:  # forget the sanity check's untrained value (not on resume)
            self.val_bpc_best.reset()

    def on_validation_epoch_end(self):
        if self.trainer.sanity_checking:
            return
        self.val_bpc_best.update(self.val_bpc.compute())
        self.log("val/bpc_best", self.val_bpc_best.compute(), prog_bar=True, sync_dist=True)

    # ------------------------------------------------------------------ vocabulary and checkpoints
    def on_fit_start(self):
        self._take_vocab()

    def on_test_start(self):
        self._take_vocab()

    def _take_vocab(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        vocab = getattr(datamodule, "vocab", None)
        if vocab is None:
            return
        if len(vocab) != self.hparams.vocab_size:
            raise ValueError(f"GPTModule: vocab_size={self.hparams.vocab_size} but the data has {len(vocab)} distinct "
                             f"characters; set model.vocab_size={len(vocab)}")
        self.vocab = vocab

    def on_save_checkpoint(self, checkpoint):
        if self.vocab is not None:
            checkpoint["vocab"] = self.vocab
        if self.val_bpc_best.update_count:
            checkpoint["val_bpc_best"] = float(self.val_bpc_best.compute())

    def on_load_checkpoint(self, checkpoint):
        if "vocab" in checkpoint:
            self.vocab = checkpoint["vocab"]
        if "val_bpc_best" in checkpoint:
            self.val_bpc_best.reset()
            self.val_bpc_best.update(torch.tensor(checkpoint["val_bpc_best"]))

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, idx: torch.Tensor, length: int, temperature: float = 1.0, top_k: int | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Append `length` sampled tokens to idx [N, T0] (T0 >= 1); returns [N, T0 + length].
        Each step sees the last context_length tokens; temperature 0 picks the most likely token,
        top_k keeps only the k most likely before sampling."""
        owner = "GPTModule.generate"
        length = check_int(owner, "length", length, minimum=0)
        temperature = check_float(owner, "temperature", temperature, 0.0)
        top_k = check_int(owner, "top_k", top_k, allow_none=True, none_means="all tokens")
        if idx.dim() != 2 or idx.shape[1] < 1 or idx.dtype != torch.int64:
            raise ValueError(f"{owner}: idx must be int64 token ids [N, T] with T >= 1, "
                             f"got {idx.dtype} {tuple(idx.shape)}")
        was_training = self.training
        self.eval()
        for _ in range(length):
            logits = self(idx[:, -self.hparams.context_length:])[:, -1].float()
            if temperature == 0.0:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None and top_k < logits.shape[-1]:
                    kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = torch.softmax(logits, dim=-1)
                nxt = torch.multinomial(probs.cpu(), 1, generator=generator).to(idx.device)
            idx = torch.cat([idx, nxt], dim=1)
        self.train(was_training)
        return idx
