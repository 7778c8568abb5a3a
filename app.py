"""UserSim Studio: builds and launches the Gradio app (``python app.py``)."""

import spaces  # noqa: F401  - before torch: ZeroGPU patches CUDA on import

from usersim_ui.ui import build_app, simulator

if __name__ == "__main__":
    simulator()  # load (and on first run convert) the models before the page opens
    build_app().queue(default_concurrency_limit=1).launch(server_name="0.0.0.0")
