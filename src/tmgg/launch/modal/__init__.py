"""The Modal transport: app, dispatch, settings, calls, results."""
