"""The component class allow-list every site of this project runs with.

FLARE refuses pre-installed (non-BYOC) component classes outside a site's ``class_allow_list``
(``local/resources.json``). This project's list: FLARE's defaults plus the ``fedmed`` package.
Provisioning templates and the simulator path both use :func:`class_allow_list`.
"""

from nvflare.app_common.default_component_policy import DEFAULT_CLASS_ALLOW_LIST

PROJECT_PACKAGES = ("fedmed.",)  # a trailing dot allows the whole package


def class_allow_list() -> list[str]:
    return [*DEFAULT_CLASS_ALLOW_LIST, *PROJECT_PACKAGES]
