"""An Ollama `Modelfile` for an exported GGUF file: FROM, TEMPLATE (Ollama's Go template, translated from
the tokenizer's Jinja chat template), stop tokens and parameters.

The translation is hand-written (no maintained library turns a Jinja chat template into Ollama's Go
template): the chat template is rendered with marker texts to read off what it writes before and after
each role's turn, a Go template is built from those pieces, and the pieces are checked by rebuilding four
conversations and comparing them with the Jinja template's own output. A template that does not decompose
this way (one that folds the system prompt into the first user turn, say) gets no TEMPLATE line: Ollama
then picks a template from the chat template inside the GGUF file itself.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

_S, _U1, _A1, _U2 = "SYSTEMq7x", "USERONEq7x", "ASSISTANTq7x", "USERTWOq7x"


@dataclass(frozen=True)
class ChatPieces:
    """What the chat template writes around each turn."""

    system_prefix: str
    system_suffix: str
    no_system: str  # what comes before the first user turn when there is no system prompt
    user_prefix: str
    user_suffix: str
    assistant_prefix: str
    assistant_suffix: str
    generation_prompt: str

    def render(self, system: str | None, turns: list[tuple[str, str]]) -> str:
        """The prompt these pieces build (what the Go template writes), ending with the generation prompt."""
        out = f"{self.system_prefix}{system}{self.system_suffix}" if system else self.no_system
        for index, (role, content) in enumerate(turns):
            last = index == len(turns) - 1
            if role == "user":
                out += f"{self.user_prefix}{content}{self.user_suffix}" + (self.generation_prompt if last else "")
            else:
                out += f"{self.assistant_prefix}{content}" + ("" if last else self.assistant_suffix)
        return out

    def go_template(self) -> str:
        return ("{{ if .System }}" + self.system_prefix + "{{ .System }}" + self.system_suffix
                + "{{ else }}" + self.no_system + "{{ end }}"
                + "{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}"
                + '{{ if eq .Role "user" }}' + self.user_prefix + "{{ .Content }}" + self.user_suffix
                + "{{ if $last }}" + self.generation_prompt + "{{ end }}"
                + '{{ else if eq .Role "assistant" }}' + self.assistant_prefix + "{{ .Content }}"
                + "{{ if not $last }}" + self.assistant_suffix + "{{ end }}{{ end }}{{ end }}")


def chat_pieces(tokenizer: Any) -> ChatPieces | None:
    """The template's pieces, or None when it has none or does not decompose into per-turn pieces."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    try:
        pieces = _read_pieces(lambda msgs, gen: tokenizer.apply_chat_template(
            msgs, tokenize=False, add_generation_prompt=gen))
    except Exception:  # a template that raises on these conversations (strict role order, say)
        return None
    if pieces is None or not _rebuilds(pieces, tokenizer):
        return None
    if any(marker in part for part in vars(pieces).values() for marker in ("{{", "}}", '"""')):
        return None  # text Go would read as an action, or that would end the Modelfile's """ block
    return pieces


def without_leading_bos(pieces: ChatPieces, tokenizer: Any) -> ChatPieces:
    """The pieces without the BOS text a template writes first, when the tokenizer (and so llama.cpp, from
    the file's add_bos_token) adds BOS itself: else the prompt would start with it twice (Llama 3's
    template writes <|begin_of_text|>; Ollama's own llama3 template leaves it out)."""
    bos = tokenizer.bos_token
    if not bos or not _adds_bos(tokenizer):
        return pieces
    strip = {name: value[len(bos):] for name, value in (("system_prefix", pieces.system_prefix),
                                                         ("no_system", pieces.no_system)) if value.startswith(bos)}
    return dataclasses.replace(pieces, **strip)


def _adds_bos(tokenizer: Any) -> bool:
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def _read_pieces(render: Any) -> ChatPieces | None:
    def msg(role: str, content: str) -> dict[str, str]:
        return {"role": role, "content": content}

    full = render([msg("system", _S), msg("user", _U1), msg("assistant", _A1), msg("user", _U2)], True)
    closed = render([msg("system", _S), msg("user", _U1), msg("assistant", _A1), msg("user", _U2)], False)
    alone = render([msg("system", _S)], False)
    bare = render([msg("user", _U1)], False)
    cuts = [full.find(m) for m in (_S, _U1, _A1, _U2)]
    if -1 in cuts or cuts != sorted(cuts) or not closed.startswith(full[:cuts[3]]) or _S not in alone:
        return None
    head, sys_to_user = full[:cuts[0]], full[cuts[0] + len(_S):cuts[1]]
    user_to_asst, asst_to_user = full[cuts[1] + len(_U1):cuts[2]], full[cuts[2] + len(_A1):cuts[3]]
    user_suffix = closed[cuts[3] + len(_U2):]
    generation = full[cuts[3] + len(_U2):]
    system_suffix = alone[alone.index(_S) + len(_S):]
    if not (generation.startswith(user_suffix) and user_to_asst.startswith(user_suffix)
            and sys_to_user.startswith(system_suffix) and alone.startswith(head)):
        return None
    user_prefix = sys_to_user[len(system_suffix):]
    if not asst_to_user.endswith(user_prefix) or _U1 not in bare or not bare[:bare.index(_U1)].endswith(user_prefix):
        return None
    return ChatPieces(system_prefix=head, system_suffix=system_suffix,
                      no_system=bare[:bare.index(_U1) - len(user_prefix)], user_prefix=user_prefix,
                      user_suffix=user_suffix, assistant_prefix=user_to_asst[len(user_suffix):],
                      assistant_suffix=asst_to_user[:len(asst_to_user) - len(user_prefix)],
                      generation_prompt=generation[len(user_suffix):])


def _rebuilds(pieces: ChatPieces, tokenizer: Any) -> bool:
    """Whether the pieces write exactly what the Jinja template writes, for conversations with and without a
    system prompt, of one and of three turns."""
    turns = [("user", "Hi there"), ("assistant", "Hello! How can I help?"), ("user", "Say 2+2.")]
    for system in ("Be brief.", None):
        for count in (1, 3):
            chosen = turns[:count]
            msgs = ([{"role": "system", "content": system}] if system else []) + [
                {"role": role, "content": content} for role, content in chosen]
            expected = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            if pieces.render(system, chosen) != expected:
                return False
    return True


def stop_words(tokenizer: Any, pieces: ChatPieces | None) -> list[str]:
    """Texts that end an answer: the end-of-sequence token and the special tokens that close an assistant
    turn or open the next user turn."""
    specials = [t for t in tokenizer.all_special_tokens if t]
    found = [tokenizer.eos_token] if tokenizer.eos_token else []
    if pieces is not None:
        for text in (pieces.assistant_suffix, pieces.user_prefix):
            found += sorted((t for t in specials if t in text), key=text.index)
    return list(dict.fromkeys(found))


def modelfile(gguf_name: str, tokenizer: Any, generation_config: Any, context_length: int) -> str:
    """The Modelfile text for `gguf_name` (a file beside it)."""
    pieces = chat_pieces(tokenizer)
    lines = ["# Ollama: ollama create NAME -f Modelfile && ollama run NAME", f"FROM ./{gguf_name}"]
    if pieces is not None:
        lines.append(f'TEMPLATE """{without_leading_bos(pieces, tokenizer).go_template()}"""')
    else:
        lines.append("# No TEMPLATE: this chat template does not translate to Ollama's; Ollama reads the one in "
                     "the GGUF file.")
    lines += [f"PARAMETER stop {_quoted(word)}" for word in stop_words(tokenizer, pieces) if '"""' not in word]
    sampling = generation_config is not None and getattr(generation_config, "do_sample", False)
    if sampling:
        for name in ("temperature", "top_p", "top_k"):
            value = getattr(generation_config, name, None)
            if value is not None:
                lines.append(f"PARAMETER {name} {value}")
    else:
        lines += ["# greedy answers, as nbtune evaluated the model", "PARAMETER temperature 0"]
    lines.append(f"PARAMETER num_ctx {min(int(context_length), 8192)}")
    return "\n".join(lines) + "\n"


def _quoted(text: str) -> str:
    # Ollama's parser strips the quotes and unescapes nothing: a word with a quote in it goes in """..."""
    return f'"""{text}"""' if '"' in text else f'"{text}"'
