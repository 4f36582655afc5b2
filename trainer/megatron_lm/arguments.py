"""What resilient reads from a Megatron-LM command line (pure: no megatron import), e.g. the model size
that sets the Slurm warning lead time.
"""

from __future__ import annotations

from dataclasses import dataclass

from trainer.presets import Architecture

WRAPPER = "trainer.megatron_lm"
"""The module that runs a Megatron-LM script as a supervised rank (`python -m trainer.megatron_lm`)."""


@dataclass(frozen=True)
class MegatronRun:
    """A Megatron-LM script's command line, as `python -m trainer.megatron_lm SCRIPT ARGS...` gets it."""

    args: tuple[str, ...]

    @classmethod
    def of(cls, rank_command: list[str]) -> MegatronRun | None:
        """The run behind a rank command that uses the wrapper, else None."""
        for i, arg in enumerate(rank_command[:-1]):
            if arg == "-m" and rank_command[i + 1] == WRAPPER:
                return cls(tuple(rank_command[i + 3 :]))  # after the script
        return None

    def value(self, flag: str) -> str | None:
        """The value of `--flag VALUE` or `--flag=VALUE` (the last one given, as argparse takes it)."""
        found = None
        for i, arg in enumerate(self.args):
            if arg == flag and i + 1 < len(self.args):
                found = self.args[i + 1]
            elif arg.startswith(flag + "="):
                found = arg.partition("=")[2]
        return found

    def number(self, flag: str) -> int | None:
        text = self.value(flag)
        return int(text) if text is not None and text.isdigit() else None

    def has(self, flag: str) -> bool:
        return flag in self.args

    def architecture(self) -> tuple[Architecture | None, str]:
        """The model as Megatron would build it (GPT; the vocabulary only when `--vocab-size` names it, else
        the embeddings are left out: about 1% of a large model), or None and the flags that are missing."""
        layers, hidden, heads = (self.number(f) for f in ("--num-layers", "--hidden-size", "--num-attention-heads"))
        missing = [
            f
            for f, v in (("--num-layers", layers), ("--hidden-size", hidden), ("--num-attention-heads", heads))
            if not v
        ]
        if missing:
            return None, f"the command line has no {', '.join(missing)}"
        assert layers and hidden and heads
        groups = self.number("--num-query-groups") if self.has("--group-query-attention") else None
        vocab = self.number("--vocab-size")
        ffn = self.number("--ffn-hidden-size") or 4 * hidden
        if not self.has("--swiglu"):  # a GELU MLP's two matrices hold what SwiGLU's three hold at 2/3 the width
            ffn = max(1, ffn * 2 // 3)
        arch = Architecture(
            num_layers=layers,
            hidden_size=hidden,
            num_attention_heads=heads,
            num_query_groups=groups or heads,
            ffn_hidden_size=ffn,
            vocab_size=vocab or 1,
            max_position_embeddings=self.number("--seq-length") or 1,
        )
        return arch, (
            "from the Megatron-LM command line" + ("" if vocab else " (embeddings not counted: no --vocab-size)")
        )
