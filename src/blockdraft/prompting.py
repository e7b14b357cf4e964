"""Turning user text into model input ids: chat template for chat models, raw text otherwise."""
from __future__ import annotations

from .errors import BlockdraftError


def encode_chat(tokenizer, turns: list[str], answers: list[str] | None = None, raw: bool = False,
                system: str | None = None) -> list[int]:
    """Ids for a conversation whose last user turn awaits an answer.

    turns[i] are user messages and answers[i] the assistant's replies to the earlier turns
    (len(answers) == len(turns) - 1). With raw=True or no chat template, the text is sent as is.
    `system` is a system message, placed by the chat template (so it needs one).
    """
    answers = answers or []
    if not turns or any(not t.strip() for t in turns):
        raise BlockdraftError("empty prompt: give some text to continue")
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if system is not None and (raw or not has_template):
        raise BlockdraftError("a system message needs the model's chat template: "
                              + ("drop --raw" if raw else "this model has none"))
    if raw or not has_template:
        text = "\n".join(sum(([t, a] for t, a in zip(turns, answers)), []) + [turns[-1]])
        return tokenizer(text, add_special_tokens=True)["input_ids"]
    messages = [{"role": "system", "content": system}] if system is not None else []
    for i, turn in enumerate(turns):
        messages.append({"role": "user", "content": turn})
        if i < len(answers):
            messages.append({"role": "assistant", "content": answers[i]})
    return encode_messages(tokenizer, messages)


def encode_messages(tokenizer, messages: list[dict]) -> list[int]:
    """Ids of chat messages ({"role", "content"}) through the chat template, the assistant's turn opened."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return list(ids)


def check_text(name: str, value: object) -> str:
    """`value` if it is text that can be encoded (a lone surrogate from an undecodable byte cannot)."""
    if not isinstance(value, str):
        raise BlockdraftError(f"{name} must be text, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise BlockdraftError(f"{name} is not valid UTF-8 text (an undecodable byte at character {exc.start})") from None
    return value


def stop_strings(stop: object) -> tuple[str, ...]:
    """Stop strings from a string or a sequence of strings; an empty one would end every answer at once."""
    strings = (stop,) if isinstance(stop, str) else stop
    if not isinstance(strings, (list, tuple)) or not all(isinstance(s, str) for s in strings):
        raise BlockdraftError(f"stop must be a string or a list of strings, got {stop!r}")
    if any(s == "" for s in strings):
        raise BlockdraftError("a stop string must not be empty")
    return tuple(strings)
