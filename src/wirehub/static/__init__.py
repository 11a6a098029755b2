"""Files the gateway serves over HTTP (``static_files.py``): the browser and Node client."""
