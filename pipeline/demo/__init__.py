"""The bundled demo: a traffic simulator (a test aid, never a tuning target), an HTTP traffic driver, and
`make demo`'s loop over simulated days through the public interfaces."""
