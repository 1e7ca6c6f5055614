"""Chat templates bundled for `chat_template: <name>` (docs/mergekit-reference.md §4), written here from the formats'
descriptions. Each is a Jinja template in the form transformers' `apply_chat_template` renders:
`messages`, `add_generation_prompt`, `bos_token`, `eos_token`, `raise_exception` are available.
"""

from __future__ import annotations

from typing import Optional

from .errors import ConfigError

# <|im_start|>{role}\n{content}<|im_end|>\n per message.
CHATML = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# bos, then <|start_header_id|>{role}<|end_header_id|>\n\n{content, trimmed}<|eot_id|> per message.
LLAMA3 = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + (message['content'] | trim) + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

# bos, then "[INST] user [/INST]assistant</s>" turns; a leading system message is prepended to the
# first user turn, separated by a blank line. Roles must alternate user/assistant.
MISTRAL = (
    "{{- bos_token }}"
    "{%- if messages and messages[0]['role'] == 'system' %}"
    "{%- set system = messages[0]['content'] %}{%- set turns = messages[1:] %}"
    "{%- else %}{%- set system = none %}{%- set turns = messages %}{%- endif %}"
    "{%- for message in turns %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('mistral chat template: roles must alternate user/assistant after an optional system message') }}"
    "{%- endif %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if loop.first and system is not none %}"
    "{{- '[INST] ' + system + '\\n\\n' + message['content'] + ' [/INST]' }}"
    "{%- else %}{{- '[INST] ' + message['content'] + ' [/INST]' }}{%- endif %}"
    "{%- else %}{{- message['content'] + eos_token }}{%- endif %}"
    "{%- endfor %}"
)

# system text, then "### Instruction:" (user), "### Input:" (user_context) and "### Response:"
# (assistant) blocks, each followed by a blank line; a response ends with eos.
ALPACA = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}{{- message['content'] + '\\n\\n' }}"
    "{%- elif message['role'] == 'user' %}{{- '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
    "{%- elif message['role'] == 'user_context' %}{{- '### Input:\\n' + message['content'] + '\\n\\n' }}"
    "{%- elif message['role'] == 'assistant' %}{{- '### Response:\\n' + message['content'] + eos_token + '\\n\\n' }}"
    "{%- else %}{{- raise_exception('alpaca chat template: unknown role ' + message['role']) }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '### Response:\\n' }}{%- endif %}"
)

# [|role|]content; system and assistant turns end with [|endofturn|], every turn with a newline.
EXAONE = (
    "{%- for message in messages %}"
    "{{- '[|' + message['role'] + '|]' + message['content'] }}"
    "{%- if message['role'] == 'user' %}{{- '\\n' }}{%- else %}{{- '[|endofturn|]\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '[|assistant|]' }}{%- endif %}"
)

BUNDLED = {"alpaca": ALPACA, "chatml": CHATML, "exaone": EXAONE, "llama3": LLAMA3, "mistral": MISTRAL}


def template_for(value: str) -> Optional[str]:
    """The Jinja text for a `chat_template:` value other than `auto`: a bundled name or a literal
    template. Anything else is a ConfigError (mergekit: "Invalid chat template")."""
    if value in BUNDLED:
        return BUNDLED[value]
    if len(value) >= 20 and "{" in value:
        return value
    raise ConfigError(
        f"chat_template: {value!r} is neither 'auto', a bundled template ({', '.join(sorted(BUNDLED))}) "
        "nor a Jinja template (at least 20 characters containing '{')"
    )
