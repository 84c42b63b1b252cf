"""toposerve's router as a Gateway API Inference Extension Endpoint Picker (Envoy ext_proc).

`protocol` is the pure core (ext_proc messages as plain data -> decisions); `service` the gRPC
shell over it; `picker` the bridge to `Router.pick`; `server` starts ext_proc and gRPC health.
"""
