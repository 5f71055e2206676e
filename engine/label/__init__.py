"""The labeling web app: people rank a policy's responses (engine/label/session.py, app.py, serve.py)."""
