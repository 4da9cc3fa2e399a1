// TDD Distill: once the node has written its LoRA, refresh the file lists of every node (as the
// "Refresh" command / R key does), so the new file is in TDD LoRA Loader's list without a reload.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

app.registerExtension({
    name: "tdd.distill.refreshLoraLists",
    setup() {
        api.addEventListener("executed", async ({ detail }) => {
            const node = app.graph?.getNodeById?.(Number(detail?.node)) ?? app.graph?.getNodeById?.(detail?.node);
            if (node?.type !== "TDDDistill") return;
            await app.refreshComboInNodes();
        });
    },
});
