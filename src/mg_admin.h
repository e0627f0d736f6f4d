/* mg_admin: the admin API (GET /status, POST /reload) on the admin listener. */
#ifndef MG_ADMIN_H
#define MG_ADMIN_H

#include "mg_version.h"

struct mg_request;

/* Answers a request that arrived on the admin listener. */
void mg_admin_handle(struct mg_request *req);

#endif
