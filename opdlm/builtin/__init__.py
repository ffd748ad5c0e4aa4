"""In an installed wheel, the built-in plugins (``opdlm/builtin/plugins``) and the shipped configs
(``opdlm/builtin/conf``): the checkout's top-level ``plugins/`` and ``conf/`` folders, packaged by
setup.py. In a checkout (or an editable install) the top-level folders are used directly (see
opdlm.paths)."""
