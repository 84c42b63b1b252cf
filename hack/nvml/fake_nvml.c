/*
 * A fake libnvidia-ml.so.1 for testing toposerve's GPU health agent without a GPU.
 *
 * It exports the NVML entry points the agent calls, with the signatures, struct layouts and
 * return codes of NVIDIA's nvml.h as documented in the NVML API Reference
 * (https://docs.nvidia.com/deploy/nvml-api/, "Device Queries", "Initialization and Cleanup",
 * "Error reporting", "Event Handling Methods") and mirrored by pynvml's ctypes declarations
 * (nvidia-ml-py: c_nvmlMemory_t, c_nvmlUtilization_t, c_nvmlEventData_t). pynvml loads it
 * exactly like the real library: ctypes.CDLL("libnvidia-ml.so.1"), found through
 * LD_LIBRARY_PATH by the dynamic loader.
 *
 * GPU state comes from a text file named by the environment variable TOPOSERVE_FAKE_NVML_STATE,
 * re-read on every call so tests change a GPU while the agent runs. One "key=value" per line,
 * '#' starts a comment:
 *
 *   driver=loaded | not_loaded | mismatch   nvmlInit: SUCCESS, DRIVER_NOT_LOADED (9),
 *                                           LIB_RM_VERSION_MISMATCH (18)
 *   count=<n>                               number of GPUs
 *   gpu.<i>.name=NVIDIA H100 80GB HBM3      nvmlDeviceGetName
 *   gpu.<i>.uuid=GPU-...                    nvmlDeviceGetUUID
 *   gpu.<i>.temp=<C>                        nvmlDeviceGetTemperature(NVML_TEMPERATURE_GPU)
 *   gpu.<i>.mem.total=<bytes> gpu.<i>.mem.used=<bytes>   nvmlDeviceGetMemoryInfo (free = total-used)
 *   gpu.<i>.util.gpu=<%> gpu.<i>.util.mem=<%>            nvmlDeviceGetUtilizationRates
 *   gpu.<i>.ecc.<vol|agg>.<corrected|uncorrected>=<n>    nvmlDeviceGetTotalEccErrors
 *   gpu.<i>.retired.<sbe|dbe>=<n>           nvmlDeviceGetRetiredPages (cause 0 = multiple SBE, 1 = DBE)
 *   gpu.<i>.remap.<corr|unc|pending|failure>=<n>         nvmlDeviceGetRemappedRows
 *   gpu.<i>.throttle=<bitmask>              nvmlDeviceGetCurrentClocks{Throttle,Event}Reasons
 *   gpu.<i>.power_mw=<milliwatts>           nvmlDeviceGetPowerUsage
 *   gpu.<i>.xids=79,48                      XID critical errors delivered, each once and in order,
 *                                           by nvmlEventSetWait_v2 (appending delivers the new ones)
 *   gpu.<i>.lost=1                          every device call returns GPU_IS_LOST (15)
 *   gpu.<i>.err.<what>=<code>               that query returns <code>, e.g. 3 = NOT_SUPPORTED;
 *                                           <what>: name uuid temp mem util ecc retired remap
 *                                           throttle power events
 *
 * Build: cc -shared -fPIC -O2 -o libnvidia-ml.so.1 fake_nvml.c (hack/nvml/build.sh).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef int nvmlReturn_t; /* an enum in nvml.h; enums are int-sized on every ABI NVML ships for */
#define NVML_SUCCESS 0
#define NVML_ERROR_UNINITIALIZED 1
#define NVML_ERROR_INVALID_ARGUMENT 2
#define NVML_ERROR_NOT_SUPPORTED 3
#define NVML_ERROR_INSUFFICIENT_SIZE 7
#define NVML_ERROR_DRIVER_NOT_LOADED 9
#define NVML_ERROR_TIMEOUT 10
#define NVML_ERROR_GPU_IS_LOST 15
#define NVML_ERROR_LIB_RM_VERSION_MISMATCH 18
#define NVML_ERROR_UNKNOWN 999

#define NVML_TEMPERATURE_GPU 0
#define NVML_MEMORY_ERROR_TYPE_CORRECTED 0
#define NVML_MEMORY_ERROR_TYPE_UNCORRECTED 1
#define NVML_VOLATILE_ECC 0
#define NVML_AGGREGATE_ECC 1
#define NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS 0
#define NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR 1
#define nvmlEventTypeXidCriticalError 0x0000000000000008ULL

#define MAX_GPUS 16

/* nvml.h: typedef struct nvmlDevice_st* nvmlDevice_t; the handle is opaque to callers. */
struct nvmlDevice_st {
    unsigned int index;
};
typedef struct nvmlDevice_st *nvmlDevice_t;

/* nvml.h: typedef struct nvmlEventSet_st* nvmlEventSet_t. */
struct nvmlEventSet_st {
    unsigned long long registered[MAX_GPUS]; /* event type mask per GPU */
    unsigned int delivered[MAX_GPUS];        /* XIDs of the state file already delivered */
};
typedef struct nvmlEventSet_st *nvmlEventSet_t;

typedef struct {
    unsigned long long total; /* bytes */
    unsigned long long free;
    unsigned long long used;
} nvmlMemory_t;

typedef struct {
    unsigned int gpu;    /* percent of time a kernel ran over the past sample period */
    unsigned int memory; /* percent of time device memory was read or written */
} nvmlUtilization_t;

typedef struct {
    nvmlDevice_t device;
    unsigned long long eventType;
    unsigned long long eventData; /* the XID for nvmlEventTypeXidCriticalError */
    unsigned int gpuInstanceId;
    unsigned int computeInstanceId;
} nvmlEventData_t;

static struct nvmlDevice_st devices[MAX_GPUS];
static int init_count = 0; /* nvmlInit and nvmlShutdown are reference counted (API reference) */

/* ---- the state file ---------------------------------------------------------------------- */

static char state[65536];

static void load_state(void) {
    const char *path = getenv("TOPOSERVE_FAKE_NVML_STATE");
    state[0] = '\0';
    if (!path) return;
    FILE *f = fopen(path, "r");
    if (!f) return;
    size_t n = fread(state, 1, sizeof(state) - 1, f);
    state[n] = '\0';
    fclose(f);
}

/* The value of `key` (copied into out), or NULL. The last occurrence wins. */
static const char *lookup(const char *key, char *out, size_t outlen) {
    const char *found = NULL;
    size_t klen = strlen(key);
    const char *line = state;
    while (*line) {
        const char *end = strchr(line, '\n');
        size_t len = end ? (size_t)(end - line) : strlen(line);
        while (len && (*line == ' ' || *line == '\t')) { line++; len--; }
        if (len > klen && strncmp(line, key, klen) == 0 && line[klen] == '=') {
            size_t vlen = len - klen - 1;
            const char *v = line + klen + 1;
            const char *hash = memchr(v, '#', vlen);
            if (hash) vlen = (size_t)(hash - v);
            while (vlen && (v[vlen - 1] == ' ' || v[vlen - 1] == '\r' || v[vlen - 1] == '\t')) vlen--;
            if (vlen >= outlen) vlen = outlen - 1;
            memcpy(out, v, vlen);
            out[vlen] = '\0';
            found = out;
        }
        if (!end) break;
        line = end + 1;
    }
    return found;
}

static unsigned long long num(const char *key, unsigned long long dflt) {
    char buf[64];
    if (!lookup(key, buf, sizeof(buf))) return dflt;
    return strtoull(buf, NULL, 0);
}

static unsigned long long gpu_num(unsigned int i, const char *field, unsigned long long dflt) {
    char key[128];
    snprintf(key, sizeof(key), "gpu.%u.%s", i, field);
    return num(key, dflt);
}

static unsigned int gpu_count(void) {
    unsigned long long n = num("count", 0);
    return n > MAX_GPUS ? MAX_GPUS : (unsigned int)n;
}

/* Common prologue of every device query: initialized, valid handle, GPU not lost, no injected
 * error for `what`. Loads the state file. */
static nvmlReturn_t check(nvmlDevice_t device, const char *what) {
    if (init_count == 0) return NVML_ERROR_UNINITIALIZED;
    load_state();
    if (!device || device < devices || device >= devices + MAX_GPUS) return NVML_ERROR_INVALID_ARGUMENT;
    if (device->index >= gpu_count()) return NVML_ERROR_INVALID_ARGUMENT;
    if (gpu_num(device->index, "lost", 0)) return NVML_ERROR_GPU_IS_LOST;
    char key[64];
    snprintf(key, sizeof(key), "err.%s", what);
    return (nvmlReturn_t)gpu_num(device->index, key, NVML_SUCCESS);
}

/* ---- initialization and errors ----------------------------------------------------------- */

nvmlReturn_t nvmlInitWithFlags(unsigned int flags) {
    (void)flags;
    load_state();
    char buf[32];
    if (lookup("driver", buf, sizeof(buf))) {
        if (strcmp(buf, "not_loaded") == 0) return NVML_ERROR_DRIVER_NOT_LOADED;
        if (strcmp(buf, "mismatch") == 0) return NVML_ERROR_LIB_RM_VERSION_MISMATCH;
    }
    for (unsigned int i = 0; i < MAX_GPUS; i++) devices[i].index = i;
    init_count++;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlInit_v2(void) { return nvmlInitWithFlags(0); }
nvmlReturn_t nvmlInit(void) { return nvmlInitWithFlags(0); }

nvmlReturn_t nvmlShutdown(void) {
    if (init_count == 0) return NVML_ERROR_UNINITIALIZED;
    init_count--;
    return NVML_SUCCESS;
}

/* Strings as NVML returns them (pynvml keeps the same table in NVMLError._errcode_to_string). */
const char *nvmlErrorString(nvmlReturn_t result) {
    switch (result) {
    case 0: return "Success";
    case 1: return "Uninitialized";
    case 2: return "Invalid Argument";
    case 3: return "Not Supported";
    case 4: return "Insufficient Permissions";
    case 5: return "Already Initialized";
    case 6: return "Not Found";
    case 7: return "Insufficient Size";
    case 8: return "Insufficient External Power";
    case 9: return "Driver Not Loaded";
    case 10: return "Timeout";
    case 11: return "Interrupt Request Issue";
    case 12: return "NVML Shared Library Not Found";
    case 13: return "Function Not Found";
    case 14: return "Corrupted infoROM";
    case 15: return "GPU is lost";
    case 16: return "GPU requires restart";
    case 17: return "The operating system has blocked the request.";
    case 18: return "RM has detected an NVML/RM version mismatch.";
    case 20: return "Insufficient Memory";
    default: return "Unknown Error";
    }
}

nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned int length) {
    if (init_count == 0) return NVML_ERROR_UNINITIALIZED;
    if (!version) return NVML_ERROR_INVALID_ARGUMENT;
    if (length < 15) return NVML_ERROR_INSUFFICIENT_SIZE;
    snprintf(version, length, "%s", "580.95.05-fake");
    return NVML_SUCCESS;
}

/* ---- device queries ---------------------------------------------------------------------- */

nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *deviceCount) {
    if (init_count == 0) return NVML_ERROR_UNINITIALIZED;
    if (!deviceCount) return NVML_ERROR_INVALID_ARGUMENT;
    load_state();
    *deviceCount = gpu_count();
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device) {
    if (init_count == 0) return NVML_ERROR_UNINITIALIZED;
    load_state();
    if (!device || index >= gpu_count()) return NVML_ERROR_INVALID_ARGUMENT;
    *device = &devices[index];
    return NVML_SUCCESS;
}

static nvmlReturn_t copy_string(nvmlDevice_t device, const char *what, const char *field, const char *dflt,
                                char *out, unsigned int length) {
    nvmlReturn_t r = check(device, what);
    if (r != NVML_SUCCESS) return r;
    if (!out) return NVML_ERROR_INVALID_ARGUMENT;
    char key[64], value[256];
    snprintf(key, sizeof(key), "gpu.%u.%s", device->index, field);
    const char *v = lookup(key, value, sizeof(value));
    if (!v) {
        snprintf(value, sizeof(value), dflt, device->index);
        v = value;
    }
    if (strlen(v) + 1 > length) return NVML_ERROR_INSUFFICIENT_SIZE;
    snprintf(out, length, "%s", v);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t device, char *name, unsigned int length) {
    return copy_string(device, "name", "name", "NVIDIA H100 80GB HBM3", name, length);
}

nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t device, char *uuid, unsigned int length) {
    return copy_string(device, "uuid", "uuid", "GPU-00000000-0000-0000-0000-%012u", uuid, length);
}

nvmlReturn_t nvmlDeviceGetTemperature(nvmlDevice_t device, int sensorType, unsigned int *temp) {
    nvmlReturn_t r = check(device, "temp");
    if (r != NVML_SUCCESS) return r;
    if (!temp || sensorType != NVML_TEMPERATURE_GPU) return NVML_ERROR_INVALID_ARGUMENT;
    *temp = (unsigned int)gpu_num(device->index, "temp", 35);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t device, nvmlMemory_t *memory) {
    nvmlReturn_t r = check(device, "mem");
    if (r != NVML_SUCCESS) return r;
    if (!memory) return NVML_ERROR_INVALID_ARGUMENT;
    memory->total = gpu_num(device->index, "mem.total", 85520809984ULL); /* H100 80GB: 81559 MiB */
    memory->used = gpu_num(device->index, "mem.used", 0);
    if (memory->used > memory->total) memory->used = memory->total;
    memory->free = memory->total - memory->used;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetUtilizationRates(nvmlDevice_t device, nvmlUtilization_t *utilization) {
    nvmlReturn_t r = check(device, "util");
    if (r != NVML_SUCCESS) return r;
    if (!utilization) return NVML_ERROR_INVALID_ARGUMENT;
    utilization->gpu = (unsigned int)gpu_num(device->index, "util.gpu", 0);
    utilization->memory = (unsigned int)gpu_num(device->index, "util.mem", 0);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetTotalEccErrors(nvmlDevice_t device, int errorType, int counterType,
                                         unsigned long long *eccCounts) {
    nvmlReturn_t r = check(device, "ecc");
    if (r != NVML_SUCCESS) return r;
    if (!eccCounts || errorType < 0 || errorType > 1 || counterType < 0 || counterType > 1)
        return NVML_ERROR_INVALID_ARGUMENT;
    char field[64];
    snprintf(field, sizeof(field), "ecc.%s.%s", counterType == NVML_VOLATILE_ECC ? "vol" : "agg",
             errorType == NVML_MEMORY_ERROR_TYPE_CORRECTED ? "corrected" : "uncorrected");
    *eccCounts = gpu_num(device->index, field, 0);
    return NVML_SUCCESS;
}

/* API reference: pageCount in = size of addresses, out = number of retired pages of that cause;
 * INSUFFICIENT_SIZE (with the needed count) when the buffer is too small or NULL. */
nvmlReturn_t nvmlDeviceGetRetiredPages(nvmlDevice_t device, int cause, unsigned int *pageCount,
                                       unsigned long long *addresses) {
    nvmlReturn_t r = check(device, "retired");
    if (r != NVML_SUCCESS) return r;
    if (!pageCount || cause < 0 || cause > 1) return NVML_ERROR_INVALID_ARGUMENT;
    unsigned int n = (unsigned int)gpu_num(
        device->index, cause == NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR ? "retired.dbe" : "retired.sbe", 0);
    if (*pageCount < n || (n > 0 && !addresses)) {
        *pageCount = n;
        return NVML_ERROR_INSUFFICIENT_SIZE;
    }
    for (unsigned int i = 0; i < n; i++) addresses[i] = 0x100000ULL * (i + 1) + (unsigned long long)cause;
    *pageCount = n;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetRemappedRows(nvmlDevice_t device, unsigned int *corrRows, unsigned int *uncRows,
                                       unsigned int *isPending, unsigned int *failureOccurred) {
    nvmlReturn_t r = check(device, "remap");
    if (r != NVML_SUCCESS) return r;
    if (!corrRows || !uncRows || !isPending || !failureOccurred) return NVML_ERROR_INVALID_ARGUMENT;
    *corrRows = (unsigned int)gpu_num(device->index, "remap.corr", 0);
    *uncRows = (unsigned int)gpu_num(device->index, "remap.unc", 0);
    *isPending = (unsigned int)gpu_num(device->index, "remap.pending", 0);
    *failureOccurred = (unsigned int)gpu_num(device->index, "remap.failure", 0);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetCurrentClocksEventReasons(nvmlDevice_t device, unsigned long long *reasons) {
    nvmlReturn_t r = check(device, "throttle");
    if (r != NVML_SUCCESS) return r;
    if (!reasons) return NVML_ERROR_INVALID_ARGUMENT;
    *reasons = gpu_num(device->index, "throttle", 0);
    return NVML_SUCCESS;
}

/* The older name of the same query (deprecated in favour of ClocksEventReasons, same bits). */
nvmlReturn_t nvmlDeviceGetCurrentClocksThrottleReasons(nvmlDevice_t device, unsigned long long *reasons) {
    return nvmlDeviceGetCurrentClocksEventReasons(device, reasons);
}

nvmlReturn_t nvmlDeviceGetPowerUsage(nvmlDevice_t device, unsigned int *power) {
    nvmlReturn_t r = check(device, "power");
    if (r != NVML_SUCCESS) return r;
    if (!power) return NVML_ERROR_INVALID_ARGUMENT;
    *power = (unsigned int)gpu_num(device->index, "power_mw", 70000);
    return NVML_SUCCESS;
}

/* ---- events (XIDs) ----------------------------------------------------------------------- */

nvmlReturn_t nvmlDeviceGetSupportedEventTypes(nvmlDevice_t device, unsigned long long *eventTypes) {
    nvmlReturn_t r = check(device, "events");
    if (r != NVML_SUCCESS) return r;
    if (!eventTypes) return NVML_ERROR_INVALID_ARGUMENT;
    *eventTypes = nvmlEventTypeXidCriticalError;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlEventSetCreate(nvmlEventSet_t *set) {
    if (init_count == 0) return NVML_ERROR_UNINITIALIZED;
    if (!set) return NVML_ERROR_INVALID_ARGUMENT;
    *set = calloc(1, sizeof(struct nvmlEventSet_st));
    return *set ? NVML_SUCCESS : NVML_ERROR_UNKNOWN;
}

/* Count the comma-separated XIDs of gpu.<i>.xids; store the k-th (0-based) in *xid if asked. */
static unsigned int xids(unsigned int i, unsigned int k, unsigned long long *xid) {
    char key[64], value[1024];
    snprintf(key, sizeof(key), "gpu.%u.xids", i);
    if (!lookup(key, value, sizeof(value))) return 0;
    unsigned int n = 0;
    char *p = value;
    while (*p) {
        while (*p == ' ' || *p == ',') p++;
        if (!*p) break;
        char *end;
        unsigned long long v = strtoull(p, &end, 0);
        if (end == p) break;
        if (n == k && xid) *xid = v;
        n++;
        p = end;
    }
    return n;
}

nvmlReturn_t nvmlDeviceRegisterEvents(nvmlDevice_t device, unsigned long long eventTypes, nvmlEventSet_t set) {
    nvmlReturn_t r = check(device, "events");
    if (r != NVML_SUCCESS) return r;
    if (!set) return NVML_ERROR_INVALID_ARGUMENT;
    if (eventTypes & ~nvmlEventTypeXidCriticalError) return NVML_ERROR_NOT_SUPPORTED;
    set->registered[device->index] |= eventTypes;
    set->delivered[device->index] = xids(device->index, 0, NULL); /* only XIDs after registration */
    return NVML_SUCCESS;
}

/* The next undelivered XID of a registered GPU, else TIMEOUT (the fake never blocks: the real
 * call waits up to timeoutms, which only changes when the caller learns, not what). */
nvmlReturn_t nvmlEventSetWait_v2(nvmlEventSet_t set, nvmlEventData_t *data, unsigned int timeoutms) {
    (void)timeoutms;
    if (init_count == 0) return NVML_ERROR_UNINITIALIZED;
    if (!set || !data) return NVML_ERROR_INVALID_ARGUMENT;
    load_state();
    for (unsigned int i = 0; i < gpu_count(); i++) {
        if (!(set->registered[i] & nvmlEventTypeXidCriticalError)) continue;
        unsigned long long xid = 0;
        unsigned int n = xids(i, set->delivered[i], &xid);
        if (n < set->delivered[i]) set->delivered[i] = n; /* the list was shortened: start over */
        if (set->delivered[i] < n) {
            set->delivered[i]++;
            memset(data, 0, sizeof(*data));
            data->device = &devices[i];
            data->eventType = nvmlEventTypeXidCriticalError;
            data->eventData = xid;
            data->gpuInstanceId = 0xFFFFFFFFu; /* not a MIG instance */
            data->computeInstanceId = 0xFFFFFFFFu;
            return NVML_SUCCESS;
        }
    }
    return NVML_ERROR_TIMEOUT;
}

nvmlReturn_t nvmlEventSetWait(nvmlEventSet_t set, nvmlEventData_t *data, unsigned int timeoutms) {
    return nvmlEventSetWait_v2(set, data, timeoutms);
}

nvmlReturn_t nvmlEventSetFree(nvmlEventSet_t set) {
    if (init_count == 0) return NVML_ERROR_UNINITIALIZED;
    free(set);
    return NVML_SUCCESS;
}
