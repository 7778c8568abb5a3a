"""UserSim Studio: builds and launches the Gradio app (``python app.py``)."""

import os

import spaces  # noqa: F401  - before torch: ZeroGPU patches CUDA on import

from usersim_ui.app.studio import build_app, simulator
from usersim_ui.app.style import STUDIO_CSS
from usersim_ui.inference.memory import limit_malloc_growth

if __name__ == "__main__":
    limit_malloc_growth()  # a long-running server: keep RSS flat (usersim_ui/inference/memory.py says why)
    simulator()  # load (and on first run convert) the models before the page opens
    port = int(os.environ.get("GRADIO_SERVER_PORT", "7860"))
    print(f"UserSim Studio: open http://localhost:{port}", flush=True)
    build_app().queue(default_concurrency_limit=1).launch(
        server_name=os.environ.get("GRADIO_SERVER_NAME", "0.0.0.0"), server_port=port, css=STUDIO_CSS,
        # USERSIM_MCP=1: also an MCP server at /gradio_api/mcp/ (README: "The simulated user as an MCP
        # tool"); otherwise gradio's own GRADIO_MCP_SERVER decides (off by default)
        mcp_server=True if os.environ.get("USERSIM_MCP") == "1" else None)
