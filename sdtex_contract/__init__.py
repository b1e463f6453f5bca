"""The contract between the Blender add-on and the backend worker: messages, parameter tables, tasks, error codes,
framing, and the rule for deleting folders. Both sides import it; it imports neither (stdlib only).

`from sdtex_contract import protocol` gives all of it in one namespace; the modules say where each part lives.
The add-on zip ships this package inside the add-on (build_addon.py vendors it, as pip vendors its dependencies);
in a checkout the add-on reaches it through the `blender_sd_addon/contract` link.
"""
