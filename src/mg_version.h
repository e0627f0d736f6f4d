/* The moongate version, as `moongate version` and the admin API's GET /status report it. */
#ifndef MG_VERSION_H
#define MG_VERSION_H
#define MOONGATE_VERSION "0.2.0"
#endif
