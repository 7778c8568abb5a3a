"""UserSim Studio: watch, steer and measure dialogues between a simulated user and an assistant.

The simulation core (every module except ``ui``) imports no gradio, so that scripts and
tests can drive dialogues without a browser.
"""

__version__ = "0.1.0"
