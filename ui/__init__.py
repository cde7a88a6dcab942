"""MagCache Studio's Gradio UI: tabs generated from ``presets.json``; handlers are plain functions
(:mod:`ui.handlers`) so tests run them without a browser."""

from .layout import CSS, JS, THEME, TabContext, build_app, build_tab, tab_extensions

__all__ = ["build_app", "build_tab", "tab_extensions", "TabContext", "CSS", "JS", "THEME"]
