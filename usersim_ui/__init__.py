"""UserSim Studio: watch, steer and measure dialogues between a simulated user and an assistant.

Tiers, each importing only from those below it (``.importlinter`` keeps it so):
``core`` (stdlib only) < ``prompts`` < ``inference`` < ``users`` < ``assistants`` <
``analysis`` < ``batch`` < ``app`` (the only tier with gradio). The README's Layout section
lists every module.
"""

__version__ = "0.2.0"
