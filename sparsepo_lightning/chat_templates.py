"""Built-in chat templates, for base/SFT models that ship none; a module of constants, so that the command-line
parsers that offer them by name (``sparsepo evaluate ... --chat-template``) need not import the data pipeline."""

from __future__ import annotations

ZEPHYR_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] in ('system', 'user', 'assistant') %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token }}"
    "{% endif %}"
    "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
    "{% endfor %}"
)
"""The Zephyr-style template the released code renders every non-code example with (docs/method.md §6.1):
``<|system|>``, ``<|user|>``, ``<|assistant|>`` blocks, each content followed by the EOS token."""

CHAT_TEMPLATES = {"zephyr": ZEPHYR_CHAT_TEMPLATE}
"""Built-in chat templates by name, for base/SFT models that ship none (Pythia, GPT-J, GPT-2)."""
