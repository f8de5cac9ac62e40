"""The web UI (`jaxswift web-ui`, `jaxswift app`): gradio forms that launch recipes as their own processes, a Runs tab
that watches their output folders, and a chat page. Importing this package imports nothing heavy (runs.py is also
the wrapper script every launched run executes)."""
