"""llama.cpp, through `llama-cpp-python` (the `gguf` extra): quantising a GGUF file and running one.

The extra compiles llama.cpp on install, so it is optional; `require()` turns its absence into one line
naming the extra, asked before any model is merged.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from noesis_accel.core.errors import UserError

EXTRA_INSTALL = "pip install -e '.[gguf]'"
# llama.cpp's file types by the names its `llama-quantize` takes; the float types are written by gguf_convert.
QUANT_TYPES = {
    "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
    "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
}


def require() -> Any:
    """The `llama_cpp` module, or a one-line UserError naming the extra that installs it."""
    try:
        import llama_cpp
    except ImportError:
        raise UserError(
            f"gguf=: GGUF export runs llama.cpp through llama-cpp-python, which is not installed; {EXTRA_INSTALL} "
            "(it compiles llama.cpp: about 5 minutes on 2 cores), then export again"
        ) from None
    return llama_cpp


@contextlib.contextmanager
def _native_output_captured() -> Iterator[list[str]]:
    """llama.cpp prints its progress from C to file descriptors 1 and 2; keep it, to show only on failure."""
    lines: list[str] = []
    with tempfile.TemporaryFile(mode="w+b") as sink:
        saved = [os.dup(1), os.dup(2)]
        try:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            yield lines
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            sink.seek(0)
            lines.extend(sink.read().decode("utf-8", "replace").splitlines())


def quantize(source: Path, out: Path, quant: str) -> Path:
    """llama.cpp's quantisation of the GGUF `source` into `out` (written under a temporary name)."""
    import ctypes

    llama_cpp = require()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANT_TYPES[quant])
    params.nthread = os.cpu_count() or 1
    tmp = out.with_name(out.name + ".tmp")
    try:
        with _native_output_captured() as output:
            status = llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), ctypes.byref(params))
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if status != 0:
        tmp.unlink(missing_ok=True)
        last = next((line for line in reversed(output) if line.strip()), "no message")
        raise RuntimeError(f"llama.cpp could not quantise {source.name} to {quant} (status {status}): {last}")
    tmp.replace(out)
    return out


class GgufModel:
    """A GGUF file loaded by llama.cpp on the CPU: its tokenizer, greedy generation and end-of-generation ids."""

    def __init__(self, path: Path, n_ctx: int = 2048) -> None:  # n_ctx: the longest prompt + answer
        llama_cpp = require()
        self._llama_cpp = llama_cpp
        self.path = path
        self.llm = llama_cpp.Llama(
            model_path=str(path), n_ctx=n_ctx, n_threads=os.cpu_count() or 1, seed=0, verbose=False
        )

    def tokens(self, text: str, add_special: bool) -> list[int]:
        """Token ids of `text`, special tokens parsed; with `add_special`, the BOS the file says to add."""
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=add_special, special=True))

    def is_end_of_generation(self, token: int) -> bool:
        return bool(self._llama_cpp.llama_vocab_is_eog(self.llm._model.vocab, token))

    def greedy(self, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        """The argmax continuation, up to and including the first end-of-generation token."""
        answer: list[int] = []
        for token in self.llm.generate(prompt_ids, temp=0.0, repeat_penalty=1.0, reset=True):
            answer.append(int(token))
            if self.is_end_of_generation(int(token)) or len(answer) >= max_new_tokens:
                break
        return answer

    def text(self, ids: list[int]) -> str:
        return self.llm.detokenize(ids).decode("utf-8", "replace")

    def close(self) -> None:
        self.llm.close()
