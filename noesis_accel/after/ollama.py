"""An Ollama `Modelfile` beside each GGUF: the file, the chat template in Ollama's Go syntax, the stop token.

Ollama cannot run Jinja. For the two template families our templates detect (ChatML, Llama 3) the
Modelfile spells the same layout in Go, with the default system prompt the training template slipped
into records without one; for any other template it leaves TEMPLATE out, and Ollama reads
`tokenizer.chat_template` from the GGUF, as it does for the templates it knows.
"""

from __future__ import annotations

from pathlib import Path

_CHATML = "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
_LLAMA3 = (
    "<|begin_of_text|>{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n"
    "{{ .Content }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n"
)


def go_template(chat_template: str | None) -> str | None:
    """The Go template for a Jinja chat template of a known family, else None."""
    if not chat_template:
        return None
    if "<|im_start|>" in chat_template and "<|im_end|>" in chat_template:
        return _CHATML
    if "<|start_header_id|>" in chat_template and "<|eot_id|>" in chat_template:
        return _LLAMA3
    return None


def modelfile(gguf_file: Path, chat_template: str | None, stop: str | None, system: str | None) -> str:
    """The Modelfile text for `gguf_file` (referred to by its name: the Modelfile sits beside it)."""
    lines = [f"# ollama create {gguf_file.stem} -f {gguf_file.stem}.Modelfile && ollama run {gguf_file.stem}"]
    lines.append(f"FROM ./{gguf_file.name}")
    template = go_template(chat_template)
    if template is not None:
        lines.append(f'TEMPLATE """{template}"""')
    elif chat_template:
        lines.append("# TEMPLATE: none written; Ollama uses the GGUF's tokenizer.chat_template")
    else:
        lines.append("# TEMPLATE: none; the model was trained on plain text, which Ollama passes as it is")
    if system:
        lines.append(f'SYSTEM """{system}"""')
    if stop:
        lines.append(f'PARAMETER stop "{stop}"')
    lines.append("PARAMETER temperature 0")
    return "\n".join(lines) + "\n"


def write_modelfile(gguf_file: Path, chat_template: str | None, stop: str | None, system: str | None) -> Path:
    path = gguf_file.with_suffix(".Modelfile")
    path.write_text(modelfile(gguf_file, chat_template, stop, system))
    return path
