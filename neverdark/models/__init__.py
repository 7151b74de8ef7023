"""Local models on the operator's machine: what a GGUF file says about itself, and the commands
built on it (`neverdark model add`).

layout.py    the KV layout llama.cpp gives a model (which layers use the sliding window)
template.py  what a chat template does with tools, and which template a server uses
facts.py     a file's header facts, cached by sha256, and the inventory fields they fill/check
speed.py     published tokens/s rates and the interactive-budget estimate `validate` warns with
add.py       `neverdark model add SOURCE`
"""
